"""lora_step.py: rows on different LoRA adapters (and the base) decoded in one batch give each adapter's own greedy
tokens, those of its checkpoint served alone (the adapter folder loaded by InstructModel: merged into the base)."""

from dataclasses import replace

import pytest
import torch

from alpaca_trainml.generation.batch import DecodeBatch, Job
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.lora_adapters import AdapterSet
from alpaca_trainml.generation.lora_step import LoraStep
from alpaca_trainml.generation.speculative import lookup_for
from inference import InstructModel

PROMPTS = ["Give three tips for staying healthy.", "Name a colour.", "Write a short poem about the sea."]
GREEDY = GenParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def served(lora_dirs):
    """The base with every adapter of lora_dirs loaded beside it, as serve.py --lora_modules does."""
    base, folders = lora_dirs
    model = InstructModel(str(base))
    model.adapters = AdapterSet(model.model, "base")
    for name, folder in folders.items():
        model.adapters.add(name, folder)
    return model


@pytest.fixture(scope="module")
def alone(lora_dirs):
    """Each adapter's greedy completions of PROMPTS served alone: {name: [token ids]}."""
    base, folders = lora_dirs
    out = {}
    for name, folder in {"base": base, **folders}.items():
        model = InstructModel(str(folder))
        out[name] = [_ids(model, c) for c in model.generate([model.encode_instruction(p) for p in PROMPTS], GREEDY)]
    return out


def _ids(model, completion):
    return model._ids(completion.text, special=False)


@pytest.mark.parametrize("speculative", ["none", "ngram"])  # ngram: drafts checked by LoraStep.verify
def test_a_batch_of_rows_on_different_adapters_gives_each_adapter_its_own_tokens(served, alone, speculative):
    lookup = lookup_for(speculative)  # a budget for 9 rows' drafts (the default's 16 positions leave 9 rows none)
    served.speculative = lookup and replace(lookup, positions=64)
    # 9 rows: every prompt on every adapter and on the base, in an order that mixes them
    names = ["all", "base", "qv", "mlp", "qv", "base", "all", "mlp", "qv"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    jobs = [Job(served.encode_instruction(p), GREEDY, adapter=served.adapters.get(n)) for p, n in zip(prompts, names)]
    batch = DecodeBatch(served)
    batch.admit(jobs)
    while batch.rows:
        batch.step()
    results = [j.future.result() for j in jobs]
    served.speculative = None
    assert (batch.drafted > 0) == (speculative == "ngram")
    for i, (name, prompt, result) in enumerate(zip(names, prompts, results)):
        assert _ids(served, result) == alone[name][PROMPTS.index(prompt)], (i, name)
    assert len({tuple(alone[n][0]) for n in alone}) == 4  # every adapter answers apart from the base and the others


def test_a_step_without_adapter_rows_takes_the_kernel_again(served):
    batch = DecodeBatch(served)
    assert isinstance(batch.stepper, LoraStep)
    ids = served.encode_instruction(PROMPTS[0])
    batch.admit([Job(ids, GREEDY, adapter=served.adapters.get("qv")), Job(ids, GREEDY)])
    batch.step()
    assert batch.stepper.decoder is None
    a, b, mask = batch.stepper.plan[0, "qkv"]  # the adapter's own pair, on row 0 only
    assert mask[:, 0].tolist() == [1, 0] and a.shape == (4 + 4, 32)  # q_proj and v_proj, rank 4 each
    batch.drop(batch.rows[:1])  # the adapter's row leaves
    batch.step()
    assert batch.stepper.plan == {} and batch.stepper.decoder is batch.stepper.kernel_decoder
    assert batch.stepper.row_adapters == [None]
    batch.end(RuntimeError("done"))


def test_a_beam_search_through_an_adapter_equals_its_checkpoint_alone(served, lora_dirs):
    from alpaca_trainml.generation.lora_adapters import applied

    params = GenParams(max_tokens=8, num_beams=2, temperature=0)
    ids = served.encode_instruction(PROMPTS[1])
    with applied(served.model, served.adapters.get("all")):
        beams = served.generate([ids], params)[0].text
    alone = InstructModel(str(lora_dirs[1]["all"]))
    assert beams == alone.generate([ids], params)[0].text
    assert served.generate([ids], params)[0].text != beams  # the hooks are gone after the block
    assert torch.is_inference_mode_enabled() is False


def test_stacks_are_kept_while_the_rows_adapters_are_among_them(served):
    batch = DecodeBatch(served)
    ids = served.encode_instruction(PROMPTS[0])
    batch.admit([Job(ids, GREEDY, adapter=served.adapters.get(n)) for n in ("qv", "all", "mlp")])
    batch.step()
    stacks = batch.stepper.stacks
    # gate/up: "all" changes gate_proj and up_proj (rank 4 each), "mlp" up_proj alone, "qv" neither
    a, b, mask = batch.stepper.plan[0, "gate_up"]
    assert a.shape[0] == 12 and mask.tolist() == [[0.0] * 12, [1.0] * 8 + [0.0] * 4, [0.0] * 8 + [1.0] * 4]
    batch.drop(batch.rows[2:])  # mlp's row leaves: qv and all are among the stacked adapters
    batch.step()
    assert batch.stepper.stacks is stacks
    assert batch.stepper.plan[0, "gate_up"][2].tolist() == [[0.0] * 12, [1.0] * 8 + [0.0] * 4]
    batch.end(RuntimeError("done"))
