"""generation/fused.py: new prompts prefilled in the running rows' decode pass. The running rows' logits must be a
plain decode step's, bit for bit; a prompt's must be the same whatever joins with it; and greedy answers must be the
same as each request run alone, through DecodeBatch, with prompts over the budget in chunks (chunked.py)."""

import pytest
import torch
import transformers

from alpaca_trainml.generation import fused
from alpaca_trainml.generation.batch import DecodeBatch, Job, run_to_end
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.llama_step import LlamaStep
from alpaca_trainml.generation.model import InstructModel

GREEDY = GenParams(max_tokens=6, temperature=0)


def test_prompts_go_in_passes_of_at_most_the_budget_and_longer_ones_are_set_aside(monkeypatch):
    monkeypatch.setattr(fused, "BUDGET", 256)
    lengths = [10, 300, 200, 100, 50, 256]
    assert fused.groups([[1] * n for n in lengths]) == ([[0, 2], [3, 4], [5]], [1])  # 10+200, 100+50, 256
    assert fused.groups([]) == ([], [])


def test_running_rows_get_a_plain_decode_step_and_prompts_their_own_numbers(decode_kernel, tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    plain, joined, alone = LlamaStep(model), LlamaStep(model), LlamaStep(model)
    assert joined.fuses  # fp32 over the kernel
    running, prompts = [[3, 4, 5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15, 16, 17, 18, 19]]
    for step in (plain, joined):
        step.prefill(running)
    pending = torch.tensor([20, 21])
    want = plain.decode(pending)
    old, new = fused.step(joined, pending, prompts)
    assert torch.equal(old, want)  # bit for bit: the prompts beside them change nothing
    assert joined.cache.lens == [6, 3, 4, 6] and new.shape == (2, want.shape[1])
    _, first = fused.step(alone, None, prompts[1:])  # the second prompt with nothing beside it
    assert torch.equal(first[0], new[1])
    apart = plain.prefill(prompts)  # torch's forward over MKL: the same logits up to the order of the sums
    torch.testing.assert_close(new, apart, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(joined.cache.keys, alone.cache.keys):  # the prompt's keys as it wrote them alone
        assert torch.equal(ours[3, :, :6], theirs[0, :, :6])


def test_greedy_answers_joining_a_batch_are_each_run_alone(decode_kernel, tiny_llama_dir, monkeypatch):
    model = InstructModel(str(tiny_llama_dir))
    texts = ["Say hi", "Name a colour", "Count to three", "Why is the sky blue? Say it in a few short words, please"]
    prompts = [model.encode(text) for text in texts]
    monkeypatch.setattr(fused, "BUDGET", max(map(len, prompts[:3])) + 1)  # two passes, and the last prompt in chunks
    assert len(prompts[3]) > fused.BUDGET and sum(map(len, prompts[:3])) > fused.BUDGET  # else the test proves less
    alone = [run_to_end(model, [Job(ids, GREEDY)])[0].text for ids in prompts]
    batch = DecodeBatch(model)
    assert fused.usable(batch.stepper)
    first = Job(prompts[0], GenParams(max_tokens=12, temperature=0))
    batch.admit([first])
    batch.step()
    rest = [Job(ids, GREEDY) for ids in prompts[1:]]
    batch.admit(rest)  # joins a running row: its pending token goes in with their prompts
    while batch.rows:
        batch.step()
    assert [j.future.result().text for j in rest] == alone[1:]
    assert first.future.result().text.startswith(alone[0])


def test_int8_short_prompts_fuse_and_long_ones_prefill_apart(decode_kernel, tiny_llama_dir, monkeypatch):
    model = InstructModel(str(tiny_llama_dir), dtype="int8")
    plain, joined, alone = (LlamaStep(model.model) for _ in range(3))
    assert fused.usable(joined) and fused.int8_kernel(joined) and fused.budget(joined) == fused.INT8_BUDGET
    running, prompts = [[3, 4, 5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15, 16, 17, 18, 19]]
    for step in (plain, joined):
        step.prefill(running)
    pending = torch.tensor([20, 21])
    old, new = fused.step(joined, pending, prompts)
    assert torch.equal(old, plain.decode(pending))  # the int8 kernel's rows are independent too: bit for bit
    _, first = fused.step(alone, None, prompts[1:])
    assert torch.equal(first[0], new[1])
    monkeypatch.setattr(fused, "INT8_BUDGET", 5)
    batch = DecodeBatch(model)
    batch.admit([Job([3, 4, 5], GREEDY), Job(list(range(3, 12)), GREEDY)])  # 3 positions fuse, 9 prefill apart
    assert not batch.filling and len(batch.rows) == 2 and batch.prefixes is not None
    assert list(batch.prefixes.entries) == [(3, 4, 5)]  # only the fused prompt is kept: its keys are the kernel's
    batch.admit([Job([3, 4, 6], GREEDY)])  # nothing apart this time: only a pass
    assert len(batch.rows) == 3


def test_a_failed_admission_fails_every_job_it_was_given(decode_kernel, tiny_llama_dir, monkeypatch):
    model = InstructModel(str(tiny_llama_dir))
    monkeypatch.setattr(fused, "BUDGET", 4)  # two passes: the second fails, with one job not in the batch yet
    batch = DecodeBatch(model)
    real, calls = fused.step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "step", failing)
    jobs = [Job([3, 4, 5], GREEDY), Job([6, 7, 8], GREEDY)]
    with pytest.raises(RuntimeError, match="out of memory"):
        batch.admit(jobs)
    for job in jobs:  # the engine ends the rows in the batch; the job of the failed pass must not wait forever
        assert job.future.done()
    with pytest.raises(RuntimeError, match="out of memory"):
        jobs[1].future.result()
