"""The decoder core's model steps and cache: our Llama-family forward (llama_step.py) against transformers' own
generate(), token for token, alone and in a batch of rows of different lengths, for the tests' Llama and a tiny model
of each family (helpers.FAMILIES), and through serve.py's engine; the static slot cache; the generic step."""

import asyncio
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import FAMILIES, ROOT, build_tiny_family, subprocess_env, tiny_family_config
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from alpaca_trainml.generation import kv_cache, llama_step, matvec
from alpaca_trainml.generation.batch import DecodeBatch
from alpaca_trainml.generation.hf_step import HFStep
from alpaca_trainml.generation.kv_cache import SlotCache
from alpaca_trainml.generation.llama_step import LlamaStep
from inference import GenParams, InstructModel
from serve import create_app

PROMPTS = [
    "Name the main subject.",
    "Summarize the text. The river paints three apples and a long letter about the weather report.",
    "Count the words.",
    "Give a one-word title for a quiet village that remembers every number below ten.",
    "Why?",
]
GREEDY = GenParams(max_tokens=32, temperature=0)  # 32 tokens on 5 prompts, as the GGUF round trip checks


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return InstructModel(str(tiny_llama_dir))


def reference(model, ids, n):
    """transformers' own greedy generate() on one prompt: the new tokens, cut after the first end-of-text."""
    with torch.inference_mode():
        out = model.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=model.pad_id)
    new = out[0, len(ids) :].tolist()
    ends = [i for i, t in enumerate(new) if t in model.eos_ids]
    return new[: ends[0] + 1] if ends else new


def test_the_tiny_llama_takes_the_llama_step(model, monkeypatch):
    assert isinstance(DecodeBatch(model).stepper, LlamaStep)
    monkeypatch.setenv(llama_step.FAST_ENV, "0")  # the switch the benchmark uses for the "before" row
    assert isinstance(DecodeBatch(model).stepper, HFStep)


def test_a_wrapped_or_other_model_takes_the_generic_step(model, tiny_llama_dir):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not llama_step.supports(wrapped) and not llama_step.supports(wrapped.base_model.model)  # LoRA layers


def test_a_partial_rope_or_gemma_takes_the_generic_step():
    """Phi-4-mini's rope turns 3/4 of each head, which our step does not: it and Gemma keep transformers' forward."""
    partial = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
    assert llama_step.supports(transformers.AutoModelForCausalLM.from_config(tiny_family_config("phi3", 64)))
    assert not llama_step.supports(
        transformers.AutoModelForCausalLM.from_config(tiny_family_config("phi3", 64, **partial))
    )
    gemma = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8
    )
    assert not llama_step.supports(transformers.AutoModelForCausalLM.from_config(gemma))


def test_the_generic_step_passes_the_cache_by_its_current_name_through_peft(tiny_llama_dir):
    import inspect
    import warnings

    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    step = HFStep(wrapped, pad_id=0)
    new_name = "cache" in inspect.signature(type(base).forward).parameters  # transformers >= 5.24
    assert step.cache_arg == ("cache" if new_name else "past_key_values")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step.prefill([[1, 5, 6]])
    assert not [w for w in caught if "past_key_values" in str(w.message)]  # transformers 5.24 warns on the old name


@pytest.mark.parametrize("fast, kernel", [("1", "1"), ("1", "0"), ("0", "1")])  # our kernel, torch's matmuls, theirs
def test_greedy_tokens_equal_transformers_alone_and_batched(model, monkeypatch, fast, kernel):
    monkeypatch.setenv(llama_step.FAST_ENV, fast)
    monkeypatch.setenv(matvec.ENV, kernel)
    prompts = [model.encode(p) for p in PROMPTS]
    expected = [reference(model, ids, GREEDY.max_tokens) for ids in prompts]
    alone = [model.generate([ids], GREEDY)[0] for ids in prompts]
    batched = model.generate(prompts, GREEDY)  # rows of different lengths in one batch, ending at different steps
    for want, one, many in zip(expected, alone, batched):
        text = model.decode([t for t in want if t not in model.eos_ids])
        assert (one.text, one.completion_tokens) == (text, len(want))
        assert (many.text, many.completion_tokens) == (text, len(want))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, spm_tokenizer_dir, tmp_path_factory):
    """(family name, InstructModel) of a tiny random model of that family, saved and loaded as a user's would be."""
    folder = build_tiny_family(request.param, spm_tokenizer_dir, tmp_path_factory.mktemp(request.param))
    return request.param, InstructModel(str(folder))


def test_each_family_gives_transformers_greedy_tokens_alone_and_batched(family, monkeypatch):
    name, model = family
    prompts = [model.encode(p) for p in PROMPTS[:4]]  # 6 to 27 tokens: past the sliding windows of 8 (helpers)
    expected = [reference(model, ids, GREEDY.max_tokens) for ids in prompts]
    for kernel in ("1", "0"):  # our kernel's whole-step decoder; torch's operations (ALPACA_MATVEC=0)
        monkeypatch.setenv(matvec.ENV, kernel)
        stepper = DecodeBatch(model).stepper
        assert isinstance(stepper, LlamaStep) and (stepper.decoder is not None) == (matvec.kernel() is not None)
        alone = [model.generate([ids], GREEDY)[0] for ids in prompts]
        batched = model.generate(prompts, GREEDY)
        for want, one, many in zip(expected, alone, batched):
            text = model.decode([t for t in want if t not in model.eos_ids])
            assert (one.text, one.completion_tokens) == (text, len(want)), (name, kernel)
            assert (many.text, many.completion_tokens) == (text, len(want)), (name, kernel)


def test_each_family_differs_where_it_should(family):
    """The families' differences reach the numbers: the scaled rope's frequencies are not the default ones, and a
    sliding window changes the logits of a prompt longer than it (so the token tests above could fail)."""
    name, model = family
    rotary, config = model.model.model.rotary_emb, model.model.config
    dim, theta = 2 * len(rotary.inv_freq), config.rope_parameters["rope_theta"]
    default = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))  # the unscaled rope's frequencies
    assert (not torch.allclose(rotary.inv_freq, default)) == name.endswith("-rope"), name
    assert (rotary.attention_scaling != 1.0) == (name == "yarn-rope"), name  # yarn's 0.1 * ln(4) + 1
    step = LlamaStep(model.model)
    windows = [layer.window for layer in step.layers]
    want = {"mistral": [8, 8], "phi3": [8, 8], "qwen2": [0, 8]}.get(name, [0, 0])  # qwen2: from max_window_layers
    assert windows == want, name
    assert (step.layers[0].q_norm is not None) == (name == "qwen3")
    if any(windows):
        prompt = list(range(3, 23))  # 20 tokens, past the window
        windowed = step.prefill([prompt])
        step.layers[:] = [layer._replace(window=0) for layer in step.layers]
        assert not torch.allclose(step.prefill([prompt]), windowed)
        assert config.sliding_window == 8


async def _completions(app, bodies):
    app.state.engine.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    finally:
        app.state.engine.stop()


def test_serve_gives_each_familys_greedy_tokens(family):
    """serve.py's app and engine (continuous batching over our step), 3 requests at once, against generate()."""
    name, model = family
    bodies = [dict(prompt=p, max_tokens=16, temperature=0) for p in PROMPTS[:3]]
    answers = asyncio.run(_completions(create_app(model), bodies))
    for body, r in zip(bodies, answers):
        want = reference(model, model.encode(body["prompt"]), 16)
        assert r.status_code == 200, r.text
        text = model.decode([t for t in want if t not in model.eos_ids])
        assert r.json()["choices"][0]["text"] == text, name
        assert r.json()["usage"]["completion_tokens"] == len(want), name


BENCH = "python -m benchmarks.family_decode --families llama phi3 gemma2 --layers 1 --vocab 512 --tokens 4 --repeat 1"


@pytest.mark.slow
def test_family_benchmark_runs_and_names_the_families_on_transformers_forward():
    argv = [sys.executable, *shlex.split(BENCH)[1:]]
    out = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    rows = {line.split()[0]: line for line in lines if line.split()[0] in ("llama", "phi3", "gemma2")}
    assert "ours (Llama step)" in rows["phi3"] and "transformers' fwd" in rows["gemma2"]
    assert all(row.endswith("yes") for row in rows.values())  # both steps chose the same greedy tokens
    assert lines[-1].startswith("family_decode: our step ") and lines[-1].endswith("on transformers' forward: gemma2")


def test_band_mask_is_causal_per_row_and_keeps_the_window():
    step = LlamaStep.__new__(LlamaStep)
    step.embed = torch.zeros(1)  # the mask's dtype
    pos = torch.tensor([[3, 4], [1, 2]])  # 2 rows, 2 queries each (as a draft being checked would have)
    seen = step._band_mask(pos, 5, window=2) == 0  # (rows, 1, s, width): True where attended
    assert seen.shape == (2, 1, 2, 5)
    assert seen[0, 0].int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]  # the last 2 positions, itself included
    assert seen[1, 0].int().tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]]
    assert (step._band_mask(pos, 5, window=0) == 0)[0, 0, 1].all()  # no window: every position up to its own


def test_rms_norm_in_two_operations_is_transformers_bit_for_bit():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
        norm.weight.data = torch.randn(48).to(dtype)
        x = (torch.randn(3, 5, 48) * 4).to(dtype)
        step = LlamaStep.__new__(LlamaStep)
        step.eps = 1e-5
        assert torch.equal(step._norm(x, norm.weight), norm(x))


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_split_weight_is_f_linear_bit_for_bit(monkeypatch, threads):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    weight = llama_step.Weight(w)
    assert weight.blocks is not None and weight.blocks.data_ptr() == w.data_ptr()  # split, and a view: no copy
    for shape in [(40,), (1, 1, 40), (3, 1, 40), (2, 8, 40), (1, 17, 40)]:  # 17 rows: past SPLIT_MAX_ROWS
        x = torch.randn(shape)
        assert torch.equal(weight(x), F.linear(x, w)), shape
    assert llama_step.Weight(torch.randn(97, 40)).blocks is None  # rows that do not split evenly: F.linear
    assert llama_step.Weight(w.bfloat16()).blocks is None


def test_fused_projections_are_views_made_once(tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    attn = model.model.layers[0].self_attn
    before = [m.weight.detach().clone() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        logits = model(ids).logits
    LlamaStep(model)
    fused = llama_step._fused([attn.q_proj, attn.k_proj, attn.v_proj])
    assert fused.data_ptr() == attn.q_proj.weight.data_ptr()  # the model's own weights now live in the fused tensor
    assert torch.equal(fused, torch.cat(before))
    assert llama_step._fused([attn.q_proj, attn.k_proj, attn.v_proj]) is fused  # a second step: no second copy
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # transformers' forward reads the same numbers


def test_slot_cache_grows_and_keeps_rows_in_order():
    cache = SlotCache(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    for n in (3, 5, 2):
        row = cache.add_row(n)
        cache.keys[0][row, :, :n] = row + 1  # each row's keys hold its number
    assert cache.lens == [3, 5, 2] and cache.rows_cap >= 3 and cache.pos_cap == 256  # one GROW step
    cache.reserve(3, 300)  # past the first step: positions double to 512, what is held stays
    assert cache.pos_cap == 512 and cache.keys[0][1, 0, :5].eq(2).all()
    cache.keep([2, 0])
    assert cache.lens == [2, 3]
    assert cache.keys[0][0, 0, :2].eq(3).all() and cache.keys[0][1, 0, :3].eq(1).all()


def test_slot_cache_moves_only_the_rows_that_change_place():
    cache = SlotCache(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    for n in (3, 5, 2, 4):
        row = cache.add_row(n)
        cache.keys[0][row, :, :n] = row + 1
    cache.keep([0, 3, 2])  # row 1 left; the last row fills its hole, rows 0 and 2 stay where they are
    assert cache.lens == [3, 4, 2]
    assert [cache.keys[0][r, 0, :n].unique().tolist() for r, n in enumerate(cache.lens)] == [[1], [4], [3]]


def test_slot_cache_gives_back_a_long_answers_room_when_it_leaves():
    cache = SlotCache(layers=2, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    cache.add_row(10)
    cache.add_row(3000)  # a long answer: positions grow to 3072
    cache.keys[1][0, :, :10] = 7
    assert cache.pos_cap == 3072
    cache.keep([0])  # it leaves; the short row stays
    assert cache.pos_cap == 256 and cache.keys[1].shape[2] == 256 and cache.keys[1][0, :, :10].eq(7).all()
    cache.add_row(600)
    cache.keep([1])  # 600 of 768 held: more than a quarter, no reallocation
    assert cache.pos_cap == 768 and cache.lens == [600]
    cache.keep([])
    assert cache.keys == [] and cache.pos_cap == cache.rows_cap == 0
    assert cache.add_row(4) == 0 and cache.keys[0].shape[2] == 256  # and it grows again from nothing


def resident_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


@pytest.mark.skipif(kv_cache._LIBC is None or not Path("/proc/self/status").exists(), reason="needs Linux glibc")
def test_a_shrunk_cache_leaves_the_process_resident_memory():
    """Each round grows 8 rows to 4096 positions (128 MiB) and lets them go: without malloc_trim, glibc kept the
    freed blocks after the first round and resident memory stayed up."""
    cache = SlotCache(layers=4, kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu")
    for _ in range(8):
        cache.add_row(100)
    before = resident_mib()
    for _ in range(3):
        cache.reserve(8, 4000)
        for t in cache.keys + cache.values:
            t.fill_(1)  # touch every page
        cache.lens = [100] * 8
        cache.keep(list(range(7)))
        cache.add_row(100)
    assert cache.pos_cap == 256
    assert resident_mib() - before < 40
