"""generation/chunked.py: a prompt over fused.BUDGET positions goes in a chunk per step. Its logits and keys must be a
fused prefill's, bit for bit; the running rows must keep decoding while it fills (with none, it fills at once); and a
caller that leaves, or an error, must end it like a running row."""

import time

import pytest
import torch
import transformers

from alpaca_trainml.generation import fused
from alpaca_trainml.generation.batch import DecodeBatch, Job, run_to_end
from alpaca_trainml.generation.chunked import Filling
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.engine import Engine, RequestCancelled
from alpaca_trainml.generation.llama_step import LlamaStep
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.generation.prefix_cache import PrefixCache

GREEDY = GenParams(max_tokens=6, temperature=0)


def test_a_prompt_filled_in_chunks_gets_a_fused_prefills_numbers(decode_kernel, tiny_llama_dir, monkeypatch):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = [3 + i % 50 for i in range(11)]
    whole, chunked = LlamaStep(model), LlamaStep(model)
    _, want = fused.step(whole, None, [ids])
    monkeypatch.setattr(fused, "BUDGET", 4)
    filling = Filling(Job(ids, GREEDY), chunked)
    steps = [filling.advance(chunked) for _ in range(3)]  # 4 + 4 + 3 positions
    assert steps[0] is None and steps[1] is None and filling.done == len(ids)
    assert torch.equal(steps[2], want)
    assert filling.join(chunked.cache) == 0 and chunked.cache.lens == [len(ids)]
    for ours, theirs in zip(chunked.cache.keys + chunked.cache.values, whole.cache.keys + whole.cache.values):
        assert torch.equal(ours[0, :, : len(ids)], theirs[0, :, : len(ids)])


def test_a_long_prompt_starts_from_a_kept_prefix(decode_kernel, tiny_llama_dir, monkeypatch):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    step, kept = LlamaStep(model), PrefixCache(2**20)
    ids = [3 + i % 50 for i in range(10)]
    fused.step(step, None, [ids], kept)
    monkeypatch.setattr(fused, "BUDGET", 4)
    job = Job(ids + [7, 8, 9, 10, 11, 12], GREEDY)
    filling = Filling(job, step, kept)
    assert job.cached == filling.done == 10  # the kept prompt's positions are copied, six are left: two chunks
    assert filling.advance(step) is None and filling.advance(step) is not None


def test_running_rows_decode_while_a_long_prompt_fills(decode_kernel, tiny_llama_dir, monkeypatch):
    model = InstructModel(str(tiny_llama_dir))
    short, long = model.encode("Say hi"), model.encode("Why is the sky blue? Say it in a few short words, please")
    monkeypatch.setattr(fused, "BUDGET", len(short))
    chunks = -(-len(long) // fused.BUDGET)
    assert len(short) <= fused.BUDGET and chunks >= 3  # else the test proves less
    alone = [run_to_end(model, [Job(ids, GREEDY)])[0].text for ids in (short, long)]
    batch = DecodeBatch(model)
    running = Job(short, GenParams(max_tokens=chunks + 4, temperature=0))
    batch.admit([running])
    waiting = Job(long, GREEDY)
    batch.admit([waiting])
    assert len(batch.filling) == 1 and len(batch.rows) == 1
    for _ in range(chunks - 1):
        batch.step()
    assert len(batch.filling) == 1 and not waiting.token_times  # not in yet
    assert len(running.token_times) == chunks  # its first token, then one a step meanwhile
    batch.step()  # the last chunk: the long prompt joins and both decode
    assert not batch.filling and len(batch.rows) == 2 and len(waiting.token_times) == 2
    while batch.rows:
        batch.step()
    assert waiting.future.result().text == alone[1]


def test_a_long_prompt_that_leaves_or_fails_ends_like_a_row(decode_kernel, tiny_llama_dir, monkeypatch):
    model = InstructModel(str(tiny_llama_dir))
    monkeypatch.setattr(fused, "BUDGET", 3)
    batch = DecodeBatch(model)
    running = Job(model.encode("Hi"), GenParams(max_tokens=1000, temperature=0))
    batch.admit([running])
    jobs = [Job(model.encode(text), GREEDY) for text in ("Name a colour", "Count to three")]
    batch.admit(jobs)
    assert [f.job for f in batch.filling] == jobs and batch.jobs() == [running, *jobs]
    batch.drop_filling([jobs[0]])
    assert [f.job for f in batch.filling] == jobs[1:]
    batch.end(RuntimeError("the model failed"))
    assert not batch.filling and not batch.jobs() and not batch.rows
    with pytest.raises(RuntimeError, match="the model failed"):
        jobs[1].future.result(timeout=1)


def test_the_engine_counts_a_filling_prompt_and_cancels_it_when_its_caller_leaves(
    decode_kernel, tiny_llama_dir, monkeypatch
):
    model = InstructModel(str(tiny_llama_dir))
    monkeypatch.setattr(fused, "BUDGET", 8)
    engine = Engine(model, max_batch_size=2)
    engine.start()
    try:
        running = Job(model.encode("Say hi"), GenParams(max_tokens=1000, temperature=0))  # the tiny model rambles on
        engine.submit(running)
        job = Job(model.encode("Why is the sky blue? " * 40), GREEDY)  # dozens of steps to fill
        engine.submit(job)
        deadline = time.monotonic() + 30
        while not (engine.batch is not None and engine.batch.filling) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.running() == 2 and engine.busy()
        job.cancel.set()
        with pytest.raises(RequestCancelled):
            job.future.result(timeout=30)
        assert not job.token_times  # it left while filling: no token was made
        running.cancel.set()
    finally:
        engine.stop()
    assert not engine.batch.filling


def test_with_no_running_row_a_long_prompt_fills_at_once(decode_kernel, tiny_llama_dir, monkeypatch):
    model = InstructModel(str(tiny_llama_dir))
    monkeypatch.setattr(fused, "BUDGET", 3)
    batch = DecodeBatch(model)
    job = Job(model.encode("Count to three"), GREEDY)
    batch.admit([job])
    assert not batch.filling and [r.job for r in batch.rows] == [job] and len(job.token_times) == 1
