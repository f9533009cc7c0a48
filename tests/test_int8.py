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

ISAS = ["generic", "avx2", "avxvnni", "avx512vnni", "avx512f32"]  # avx512f32: fp32 input rows, never chosen by auto


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


def reference(x, packed, quantized=True):
    """x @ dequantized(w).T with x quantized as the kernel does (blocks of 32, int8, fp32 scale), in float64."""
    if not quantized:
        return x.double() @ int8.dequantize(packed).double().T
    blocks = x.view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq = (torch.round(blocks * inv).clamp(-127, 127) * (amax / 127)).view_as(x)
    return xq.double() @ int8.dequantize(packed).double().T


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("shape", [(70, 96), (64, 576), (5, 32)])  # a lone last block of 32; 4 rows at a time + tail
def test_kernel_matches_a_dequantized_reference_on_every_instruction_set(decode_kernel, rows, shape):
    torch.manual_seed(rows)
    w, x = torch.randn(shape) * 0.05, torch.randn(rows, shape[1])
    packed = int8.quantize(w)
    want = reference(x, packed)
    for isa in runnable(decode_kernel):
        decode_kernel.q8_isa(isa)
        got = decode_kernel.q8_matvec(x, packed).double()
        want = reference(x, packed, quantized=isa != "avx512f32")
        # float sums in another order, nothing more; a wrong scale or layout is off by tens of percent
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), isa
    decode_kernel.q8_isa("auto")
    want = reference(x, packed)
    swapped = packed.clone()
    scales = packed[:, shape[1] :].contiguous().view(torch.float16)
    swapped[:, shape[1] :] = scales.flip(1).view(torch.uint8)  # scales in the wrong blocks: must not pass the bound
    if shape[1] > 32:
        assert (decode_kernel.q8_matvec(x, swapped).double() - want).abs().max() > 1e-3 * want.abs().max()


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
        assert (got - want).abs().max() < 0.05 * want.abs().max()  # the same model, give or take 8-bit rounding
    assert agree >= 0.8 * total, (agree, total)  # measured 49 of 50 with this tiny model (2026-12-05)


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
    ours = step.prefill([prompt])  # 20 rows: each weight dequantized, F.linear (the last row's lm_head: int8 x int8)
    theirs = quantized.model(torch.tensor([prompt])).logits[:, -1]  # transformers' forward over Int8Linear
    assert (ours - theirs).abs().max() < 0.01 * theirs.abs().max()  # only the lm_head's 8-bit activations differ
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
