"""int8 weights (generation/int8.py, csrc/int8.cpp): the packing, the kernel's products on every instruction set this
CPU has (the plain C++ one forced by ALPACA_INT8_KERNEL) against a reference in float64, greedy tokens of a tiny model
through int8 against fp32, and --dtype int8 on inference.py, serve.py and evaluate.py."""

import json

import pytest
import torch
import torch.nn.functional as F

import evaluate
import inference
from alpaca_trainml.cli import UsageError
from alpaca_trainml.generation import int8, serve_command
from alpaca_trainml.generation.llama_step import LlamaStep
from alpaca_trainml.generation.model import InstructModel

ISAS = ["generic", "avx2", "avxvnni", "avx512vnni", "avx512vnni8", "avx512f32"]  # the last two: never chosen by auto
TOP = {"avx512vnni8": 127, "avx512f32": None}  # how each rounds the input rows (else 16 bits: |X| <= 32767)


def runnable(decode_kernel):
    """The instruction sets this CPU runs (generic always)."""
    found = []
    for isa in ISAS:
        try:
            found.append(decode_kernel.q8_isa(isa))
        except RuntimeError:
            pass
    decode_kernel.q8_isa("auto")
    return found


@pytest.fixture
def back_to_auto(decode_kernel):
    yield
    decode_kernel.q8_isa("auto")  # whatever a test forced, the next one starts from the default


def test_packing_rounds_each_block_to_its_own_scale():
    torch.manual_seed(0)
    w = torch.randn(5, 96) * torch.tensor([0.01, 1.0, 100.0]).repeat_interleave(32)  # 3 blocks of unlike sizes
    packed = int8.quantize(w)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 96 + 6)  # 96 int8 + 3 fp16 scales (6 bytes) a row
    scales = packed[:, 96:].contiguous().view(torch.float16).float()
    torch.testing.assert_close(scales, (w.view(5, 3, 32).abs().amax(-1) / 127).half().float())
    err = (int8.dequantize(packed) - w).abs().view(5, 3, 32)
    assert (err <= scales[..., None] * 0.5 * 1.01).all()  # rounding to the nearest step of its own block's scale
    with pytest.raises(ValueError, match="multiple of 32"):
        int8.quantize(torch.randn(4, 40))


def quantized_input(x, top=32767):
    """x rounded as the kernel rounds it: per block of 32, to integers of at most `top` (X = round(x / e),
    e = max|x| / top in fp32), and back to fp64 (X * e)."""
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, top) / amax, torch.zeros_like(amax))  # top / amax, in fp32
    return (torch.round(blocks * inv).clamp(-top, top).double() * (amax / top).double()).view_as(x)


def reference(x, packed, top=32767):
    """x @ dequantized(w).T in float64, x rounded as the kernel does (top None: not rounded)."""
    xq = x.double() if top is None else quantized_input(x, top)
    return xq @ int8.dequantize(packed).double().T


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("shape", [(70, 96), (64, 576), (5, 32)])  # a lone last block of 32; 4 rows at a time + tail
def test_kernel_matches_a_dequantized_reference_on_every_instruction_set(decode_kernel, back_to_auto, rows, shape):
    torch.manual_seed(rows)
    w, x = torch.randn(shape) * 0.05, torch.randn(rows, shape[1])
    packed = int8.quantize(w)
    for isa in runnable(decode_kernel):
        decode_kernel.q8_isa(isa)
        got = decode_kernel.q8_matvec(x, packed).double()
        want = reference(x, packed, TOP.get(isa, 32767))
        # float sums in another order, nothing more (measured <= 1.5e-7); a wrong scale or layout is off by tens of
        # percent, 8-bit input rows by about 5e-3
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), isa
    decode_kernel.q8_isa("auto")
    want = reference(x, packed)
    swapped = packed.clone()
    scales = packed[:, shape[1] :].contiguous().view(torch.float16)
    swapped[:, shape[1] :] = scales.flip(1).view(torch.uint8)  # scales in the wrong blocks: must not pass the bound
    if shape[1] > 32:
        assert (decode_kernel.q8_matvec(x, swapped).double() - want).abs().max() > 1e-3 * want.abs().max()


def test_16_bit_input_rows_split_into_high_and_low_bytes_exactly(decode_kernel, back_to_auto):
    # |X| = 256 H + L: every L from 0 to 255 (128..255 would go wrong read as signed), H up to 127, both signs, and
    # X = +-32767 (the block's largest, e = 1 / 32767): each row's products are whole numbers times d_w / 32767
    mags = torch.cat([torch.arange(256), torch.arange(1, 128) * 256 + 255, torch.tensor([32767])])
    X = (mags * torch.tensor([1, -1]).repeat(len(mags) // 2 + 1)[: len(mags)]).reshape(-1)
    X = torch.cat([X, torch.zeros((-len(X)) % 31, dtype=X.dtype)]).view(-1, 31)
    X = torch.cat([torch.full((len(X), 1), 32767), X], 1)  # every block's max |x| is 1: X comes back exactly
    x = (X.double() / 32767).float().view(1, -1)
    w = torch.randn(9, x.shape[1]) * 0.05
    packed = int8.quantize(w)
    q = packed[:, : x.shape[1]].view(torch.int8).long().view(9, -1, 32)
    d = packed[:, x.shape[1] :].contiguous().view(torch.float16).double()
    exact = ((q * X.long()).sum(-1).double() * d / 32767).sum(-1)  # integer block sums, then the scales
    for isa in runnable(decode_kernel):
        if isa in TOP:
            continue
        decode_kernel.q8_isa(isa)
        got = decode_kernel.q8_matvec(x, packed).double()[0]
        assert (got - exact).abs().max() <= 1e-6 * exact.abs().max(), isa  # fp32 sums of exact block sums


def test_every_instruction_set_forced_by_the_env_var_gives_the_generic_numbers(
    decode_kernel, back_to_auto, monkeypatch
):
    torch.manual_seed(0)
    w, x = torch.randn(130, 1536) * 0.05, torch.randn(5, 1536)  # 1536: the AVX512 kernel's chunks of 128 blocks + 32
    packed = int8.quantize(w)
    results = {}
    for isa in ["generic", *[i for i in runnable(decode_kernel) if i not in TOP and i != "generic"]]:
        monkeypatch.setenv(int8.ISA_ENV, isa)
        results[isa] = int8.linear(x, packed, k=int8.kernel())
        assert int8.instructions() == isa
    for isa, y in results.items():
        assert (y - results["generic"]).abs().max() <= 1e-5 * y.abs().max(), isa  # the same sums, another order
    full = x.double() @ int8.dequantize(packed).double().T
    err16 = (results["generic"] - full).abs().max() / full.abs().max()
    err8 = (reference(x, packed, 127) - full).abs().max() / full.abs().max()
    assert err16 < 1e-4 < err8 / 10  # measured 2e-5 and 5e-3: 16-bit input rows are some 250x closer to fp32


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    return InstructModel(str(tiny_llama_dir), dtype="float32"), InstructModel(str(tiny_llama_dir), dtype="int8")


def teacher_forced(step, prompt, tokens):
    """Each step's logits (len(tokens) + 1, vocab) when the row is fed `tokens` after `prompt`."""
    step.keep([])
    out = [step.prefill([prompt])]
    for t in tokens:
        out.append(step.decode(torch.tensor([t])))
    return torch.cat(out)


def greedy(step, prompt, n):
    step.keep([])
    logits, tokens = step.prefill([prompt]), []
    for _ in range(n):
        tokens.append(int(logits.argmax(-1)))
        logits = step.decode(torch.tensor(tokens[-1:]))
    return tokens


@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_int8_greedy_tokens_follow_fp32_on_most_steps(decode_kernel, models, monkeypatch, isa):
    monkeypatch.setenv(int8.ISA_ENV, isa)
    full, quantized = models
    assert int8.is_quantized(quantized.model) and not int8.is_quantized(full.model)
    ref, step = LlamaStep(full.model), LlamaStep(quantized.model)
    assert step.decoder is not None  # the whole step in the kernel
    assert (int8.instructions() == "generic") == (isa == "generic")
    agree = total = 0
    for prompt in ([1, 5, 9, 13], [1, 30, 31, 2, 7, 7, 40, 41]):
        tokens = greedy(ref, prompt, 24)
        want, got = teacher_forced(ref, prompt, tokens), teacher_forced(step, prompt, tokens)
        agree += (want.argmax(-1) == got.argmax(-1)).sum().item()
        total += len(want)
        assert (got - want).abs().max() < 0.05 * want.abs().max()  # the same model, int8 weights (measured 0.7%)
    assert agree >= 0.8 * total, (agree, total)  # measured 50 of 50 (49 with 8-bit input rows, 2026-12-05)


def test_int8_verify_gives_decodes_numbers(decode_kernel, models):
    step = LlamaStep(models[1].model)
    assert step.verifies  # the kernel runs both: speculative decoding keeps int8's greedy tokens
    prompt, draft = [1, 30, 31, 2, 7], [7, 40, 41]
    step.prefill([prompt])
    one_by_one = [step.decode(torch.tensor([t])) for t in draft]
    step.keep([])
    step.prefill([prompt])
    (at_once,) = step.verify(torch.tensor([draft]))
    assert torch.equal(torch.cat(one_by_one), at_once)  # bit for bit: each position is one row of the kernel's step


def test_prefill_and_hf_forward_run_the_same_int8_weights(decode_kernel, models):
    _, quantized = models
    step = LlamaStep(quantized.model)
    prompt = list(range(1, 21))
    ours = step.prefill([prompt])  # 20 rows: each weight dequantized, F.linear (the last row's lm_head: the kernel)
    theirs = quantized.model(torch.tensor([prompt])).logits[:, -1]  # transformers' forward over Int8Linear
    assert (ours - theirs).abs().max() < 1e-3 * theirs.abs().max()  # only the lm_head's 16-bit input rows differ: 3e-5
    layer = quantized.model.model.layers[0].self_attn.q_proj
    assert type(layer) is int8.Int8Linear and layer.weight.dtype == torch.uint8
    assert quantized.model.lm_head.weight.dtype == torch.uint8
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), F.linear(x, int8.dequantize(layer.weight)))


def test_the_scripts_take_dtype_int8(tiny_llama_dir, tmp_path):
    assert inference.parse_args(["--instruction", "x", "--dtype", "int8"]).dtype == "int8"
    assert serve_command.parse_args(["--dtype", "int8"]).dtype == "int8"
    eval_set, out = tmp_path / "eval.json", tmp_path / "answers.json"
    eval_set.write_text(json.dumps([{"instruction": "Name a color.", "input": "", "output": "Red."}]))
    evaluate.generate(eval_set, out, model_name_or_path=str(tiny_llama_dir), max_tokens=4, dtype="int8")
    assert len(json.loads(out.read_text())) == 1


def test_serve_refuses_int8_with_lora_adapters_before_the_model_loads(tiny_llama_dir):
    args = serve_command.parse_args(["--model_name_or_path", str(tiny_llama_dir), "--dtype", "int8"])
    args.allow_runtime_lora_updating = True
    with pytest.raises(UsageError, match="int8 serves no LoRA adapters"):
        serve_command.main(args)


def test_a_bad_dtype_is_one_clear_error(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        inference.parse_args(["--instruction", "x", "--dtype", "int4"])
    assert e.value.code == 2 and "int8" in capsys.readouterr().err  # argparse lists the choices
    with pytest.raises(UsageError, match="dtype.*int8"):
        evaluate.generate(tmp_path / "eval.json", tmp_path / "out.json", dtype="int4")
    with pytest.raises(UsageError, match="int16"):
        InstructModel(str(tiny_llama_dir), dtype="int16")
    with pytest.raises(UsageError, match="ALPACA_INT8_KERNEL=sse9"):
        with pytest.MonkeyPatch.context() as m:
            m.setenv(int8.ISA_ENV, "sse9")
            int8.kernel()


def test_agreement_counts_the_reference_tokens_before_the_first_difference():
    from benchmarks.int8_quality import common_prefix

    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([1, 2, 0], [1, 2, 0]) == 3  # both ended at the same end of text: all of it
    assert common_prefix([5, 6], [7]) == 0
