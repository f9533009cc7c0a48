"""The decode kernels (generation/matvec.py, csrc/decode.cpp): the matmul against F.linear (every shape the Llama
step gives it, fp32 and bf16 weights, odd sizes that leave a tail), the whole-step decoder against our Python forward
over torch's operations, and the switch that turns them off."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import FAMILIES, tiny_family_config

from alpaca_trainml.generation import llama_step, matvec
from alpaca_trainml.generation.llama_step import LlamaStep


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("shape", [(96, 40), (130, 576), (64, 33), (1, 7)])
def test_kernel_is_as_exact_as_f_linear(decode_kernel, rows, shape):
    torch.manual_seed(rows)
    w, x = torch.randn(shape), torch.randn(rows, shape[1])
    exact = F.linear(x.double(), w.double())
    got, theirs = decode_kernel.matvec(x, w), F.linear(x, w)
    assert got.shape == theirs.shape and got.dtype == torch.float32
    ours_err, their_err = (got - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert ours_err <= 4 * their_err + 1e-6, (ours_err, their_err)  # rounding of a different order, no more


def runnable_f32_isas(kernel):
    """The fp32 matmul's instruction sets this CPU runs (csrc/f32.cpp), generic always among them."""
    found = []
    for isa in ("generic", "avx2", "avx512"):
        try:
            found.append(kernel.f32_isa(isa))
        except RuntimeError:
            pass  # this CPU lacks it
    kernel.f32_isa("auto")
    return found


@pytest.fixture
def f32_isas(decode_kernel):
    yield runnable_f32_isas(decode_kernel)
    decode_kernel.f32_isa("auto")  # the best again for the tests after


def test_small_row_matmul_of_each_isa_is_f_linear_and_the_same_alone(decode_kernel, f32_isas):
    """Every fp32 instruction set on 1 to 9 rows (each row count blocks the rows differently: 1 x 8, 2 x 8 and up to
    6 x 4 on AVX-512, 3 x 4 on AVX2, passes of up to 6 rows past 6) and on shapes that leave a tail of weight rows
    and of `in`: as exact as F.linear, and each row's numbers bit for bit those of the row alone (a verify step of
    several positions gives a plain step's numbers)."""
    assert "generic" in f32_isas and decode_kernel.f32_isa("auto") == f32_isas[-1]  # auto: the best one
    for isa in f32_isas:
        decode_kernel.f32_isa(isa)
        for rows in range(1, 10):
            for shape in [(130, 576), (37, 100), (9, 1536)]:
                torch.manual_seed(rows)
                w, x = torch.randn(shape), torch.randn(rows, shape[1])
                got = decode_kernel.matvec(x, w)
                exact = F.linear(x.double(), w.double())
                ours, theirs = (got - exact).abs().max().item(), (F.linear(x, w) - exact).abs().max().item()
                # SIMD: as test_kernel_is_as_exact_as_f_linear; generic sums each output in one running sum, whose
                # rounding grows with `in` (5x F.linear's at in = 576 here): within 1e-5 of the largest output
                limit = 4 * theirs + 1e-6 if isa != "generic" else 1e-5 * exact.abs().max().item()
                assert ours <= limit, (isa, rows, shape, ours, theirs)
                alone = torch.cat([decode_kernel.matvec(x[r : r + 1], w) for r in range(rows)])
                assert torch.equal(got, alone), (isa, rows, shape)
    with pytest.raises(RuntimeError, match="f32_isa"):
        decode_kernel.f32_isa("sse9")


def fma32(a, b, c):
    """fp32 a * b + c rounded once, as the FMA instruction does (numpy has no FMA): the product is exact in fp64, the
    sum's fp64 rounding error is recovered exactly (two-sum), and it settles the one case where rounding to fp64 and
    then to fp32 goes wrong, a sum that lands exactly halfway between two fp32 numbers."""
    p, c64 = a.astype(np.float64) * b, c.astype(np.float64)
    s = p + c64
    back = s - p
    err = (p - (s - back)) + (c64 - back)  # p + c == s + err exactly
    r = s.astype(np.float32)
    other = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)))
    tie = (s != r) & (s == (r.astype(np.float64) + other) / 2) & (err != 0)
    return np.where(tie, np.where(err > 0, np.maximum(r, other), np.minimum(r, other)), r)


def f32_rows_in_order(x, w, lanes):
    """y = x @ w.T summed as csrc/f32.cpp promises: per output one accumulator of `lanes` fp32 lanes, FMAs over `in` in
    order, the lanes added i + (i + lanes / 2), then halving again to one lane, then the in % lanes tail in order."""
    x, w = x.numpy(), w.numpy()
    body = x.shape[1] // lanes * lanes
    acc = np.zeros((x.shape[0], w.shape[0], lanes), np.float32)
    for i in range(0, body, lanes):
        acc = fma32(w[None, :, i : i + lanes], x[:, None, i : i + lanes], acc)
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    y = acc[..., 0]
    for j in range(body, x.shape[1]):
        y = y + x[:, j : j + 1] * w[None, :, j]
    return torch.from_numpy(y)


def test_small_row_matmul_sums_in_its_documented_order(decode_kernel, f32_isas):
    """AVX-512 and AVX2 against an emulation of their summation order (f32_rows_in_order), bit for bit, at every row
    count from 1 to 20 (each blocked its own way) and at 70 (12 passes of up to 6 rows), on shapes that leave a tail
    of weight rows and of `in`: a kernel that reduces or blocks its sums in another order fails here."""
    simd = [isa for isa in f32_isas if isa != "generic"]
    if not simd:
        pytest.skip("this CPU has neither AVX2 nor AVX-512")
    torch.manual_seed(0)
    for isa in simd:
        decode_kernel.f32_isa(isa)
        lanes = 16 if isa == "avx512" else 8
        for shape in [(37, 100), (70, 64)]:
            w = torch.randn(shape)
            for rows in [*range(1, 21), 70]:
                x = torch.randn(rows, shape[1])
                want = f32_rows_in_order(x, w, lanes)
                assert not torch.equal(want, f32_rows_in_order(x, w, 32 // lanes))  # the order shows in the bits
                assert torch.equal(decode_kernel.matvec(x, w), want), (isa, shape, rows)


def test_bf16_weights_accumulate_in_fp32(decode_kernel):
    torch.manual_seed(0)
    w, x = torch.randn(200, 100).bfloat16(), torch.randn(2, 100)
    torch.testing.assert_close(decode_kernel.matvec(x, w), x @ w.float().T, rtol=1e-5, atol=1e-5)


def test_bad_operands_raise(decode_kernel):
    with pytest.raises(RuntimeError, match="matvec"):
        decode_kernel.matvec(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="matvec"):
        decode_kernel.matvec(torch.randn(2, 4), torch.randn(3, 4).half())


def test_weight_takes_the_kernel_for_few_rows_only(decode_kernel):
    torch.manual_seed(0)
    w = torch.randn(48, 40)
    weight = llama_step.Weight(w, decode_kernel)
    assert weight.kernel is decode_kernel and weight.blocks is None
    for shape in [(40,), (1, 1, 40), (3, 1, 40), (2, 8, 40), (1, 17, 40)]:
        x = torch.randn(shape)
        torch.testing.assert_close(weight(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 17, 40)  # past SPLIT_MAX_ROWS: F.linear itself
    assert torch.equal(weight(x), F.linear(x, w))
    half = llama_step.Weight(w.bfloat16(), decode_kernel)
    xb = torch.randn(1, 1, 40).bfloat16()
    assert half(xb).dtype == torch.bfloat16
    torch.testing.assert_close(half(xb), F.linear(xb, w.bfloat16()), rtol=1e-2, atol=1e-2)
    assert llama_step.Weight(w.t(), decode_kernel).kernel is None  # not contiguous: the split matmul or F.linear


def test_switched_off_it_is_never_built(monkeypatch):
    monkeypatch.setenv(matvec.ENV, "0")
    assert matvec.kernel() is None


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'alpaca_decode_avx2'\ng++: not found")

    monkeypatch.setattr(matvec, "_built", {})
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level("WARNING"):
        assert matvec.kernel() is None
        assert matvec.kernel() is None
    warned = [r.getMessage() for r in caplog.records if "decode kernel not built" in r.getMessage()]
    assert len(warned) == 1 and "Error building extension" in warned[0]


def family_model(name, dtype=torch.float32):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_family_config(name, 64), dtype=dtype).eval()


@pytest.mark.parametrize("name", [None, *sorted(FAMILIES)])  # None: the tests' Llama
def test_decoder_step_is_the_python_forward_on_rows_of_different_lengths(decode_kernel, tiny_llama_dir, name):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir) if name is None else family_model(name)
    fused, plain = LlamaStep(model.eval()), LlamaStep(model)
    assert fused.decoder is not None
    plain.decoder = None  # the same step over torch's operations (with the kernel's matmuls)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    for step in (fused, plain):
        step.prefill(prompts)
    ids = torch.tensor([5, 6, 7])
    for _ in range(6):
        got, want = fused.decode(ids), plain.decode(ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        ids = want.argmax(-1)
    assert fused.cache.lens == plain.cache.lens == [13, 8, 9]
    for ours, theirs in zip(fused.cache.keys + fused.cache.values, plain.cache.keys + plain.cache.values):
        torch.testing.assert_close(ours[:3, :, :13], theirs[:3, :, :13], rtol=1e-4, atol=1e-4)
    fused.keep([2, 0])  # a finished row leaves: the rest go on where they were
    plain.keep([2, 0])
    torch.testing.assert_close(fused.decode(ids[[2, 0]]), plain.decode(ids[[2, 0]]), rtol=1e-4, atol=1e-4)


def test_decoder_refuses_a_position_outside_its_cache(decode_kernel, tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    step = LlamaStep(model)
    step.prefill([[3, 4, 5]])
    h = F.embedding(torch.tensor([4]), step.embed)
    cos = sin = torch.zeros(1, step.head_dim)
    with pytest.raises(RuntimeError, match="outside the cache"):
        step.decoder.step(h, cos, sin, step.cache.keys, step.cache.values, [step.cache.pos_cap])


def test_bf16_decoder_is_as_close_to_fp32_as_transformers_bf16(decode_kernel, tiny_llama_dir):
    """bf16 rounds at every operation, so two correct bf16 steps differ; ours must be no further from the fp32
    model than transformers' own bf16 forward is (it rounds where transformers rounds, and sums in fp32)."""
    full = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    half = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    assert_bf16_decoder_as_close(full, half, [3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16])


@pytest.mark.parametrize("name", ["llama-biases", "mistral", "phi3", "qwen2", "qwen3"])
def test_bf16_decoder_of_each_family_is_as_close_as_transformers_bf16(decode_kernel, name):
    full, half = family_model(name), family_model(name, torch.bfloat16)
    assert_bf16_decoder_as_close(full, half, list(range(3, 15)), list(range(20, 30)))  # 12 + 10: past the windows


def assert_bf16_decoder_as_close(full, half, prompt, fed):
    ids = torch.tensor([prompt + fed])
    with torch.no_grad():
        exact = full(ids).logits[0, len(prompt) - 1 : -1]
        theirs = half(ids).logits[0, len(prompt) - 1 : -1].float()
    step = LlamaStep(half)
    assert step.decoder is not None and step.cache.dtype == torch.bfloat16
    ours = [step.prefill([prompt])[0]] + [step.decode(torch.tensor([t]))[0] for t in fed[:-1]]
    ours = torch.stack(ours).float()
    ours_err, their_err = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert their_err > 0 and ours_err <= 2 * their_err, (ours_err, their_err)


def test_weights_of_mixed_dtypes_build_no_decoder_rather_than_fail(decode_kernel, tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    model.model.layers[0].input_layernorm.float()  # the kernel takes one dtype throughout: no decoder, no error
    assert LlamaStep(model).decoder is None


def test_decoder_takes_the_llama_only_arguments_as_before(decode_kernel, tiny_llama_dir):
    """LlamaDecoder(weights of 6 per layer, heads, kv_heads, dim, eps, scale): the call before biases, q/k norms and
    windows still builds the same step."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    step = LlamaStep(model)
    weights = [layer.kernel_tensors(None)[:6] for layer in step.layers]
    old = decode_kernel.LlamaDecoder(weights, step.heads, step.kv_heads, step.head_dim, step.eps, step.scale)
    step.prefill([[3, 4, 5]])
    h = F.embedding(torch.tensor([6]), step.embed)
    cos, sin = (t[:, 0].contiguous() for t in step.rotary(h, torch.tensor([[3]])))
    keys, values = [k.clone() for k in step.cache.keys], [v.clone() for v in step.cache.values]
    want = step.decoder.step(h.clone(), cos, sin, step.cache.keys, step.cache.values, [3])
    assert torch.equal(old.step(h.clone(), cos, sin, keys, values, [3]), want)
    with pytest.raises(RuntimeError, match="one window per layer"):
        decode_kernel.LlamaDecoder(weights, step.heads, step.kv_heads, step.head_dim, step.eps, step.scale, [0])


@pytest.mark.parametrize("name,dtype", [(None, torch.float32), (None, torch.bfloat16), ("mistral", torch.float32)])
def test_verify_of_several_positions_per_row_is_decode_bit_for_bit(decode_kernel, tiny_llama_dir, name, dtype):
    """A speculative verify runs each row's draft positions as rows of one kernel step in that row's cache slot: its
    logits and cache must be those of decoding the tokens one step at a time (greedy speculation is then exactly
    plain decoding). Mistral: a sliding window (tiny_family_config's) that the 9-token prompt passes."""
    if name is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    else:
        model = family_model(name, dtype)
    one, many = LlamaStep(model), LlamaStep(model)
    assert one.decoder is not None and many.verifies
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [10, 11], [12, 13, 14]]
    for step in (one, many):
        step.prefill(prompts)
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    counts = [4, 1, 3]  # row 1: no draft (its pending token only); the others' shorter drafts padded
    want = [one.decode(tokens[:, j]) for j in range(4)]
    got = many.verify(tokens, counts)
    for r, c in enumerate(counts):
        assert torch.equal(got[r], torch.stack([w[r] for w in want[:c]]))
        for ours, theirs in zip(many.cache.keys + many.cache.values, one.cache.keys + one.cache.values):
            n = len(prompts[r]) + c
            assert torch.equal(ours[r, :, :n], theirs[r, :, :n])
    many.rewind([4 - c for c in counts])
    assert many.cache.lens == [13, 3, 6]
    alone = LlamaStep(model)  # batch 1, as plain decoding of one request runs: the same numbers again
    alone.prefill(prompts[:1])
    assert torch.equal(torch.cat([alone.decode(tokens[:1, j]) for j in range(4)]), got[0])


def test_decoder_refuses_a_slot_outside_its_cache(decode_kernel, tiny_llama_dir):
    step = LlamaStep(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval())
    step.prefill([[3, 4, 5]])
    h = F.embedding(torch.tensor([4]), step.embed).float()
    cos = sin = torch.zeros(1, step.head_dim)
    with pytest.raises(RuntimeError, match="slot outside the cache"):
        step.decoder.step(h, cos, sin, step.cache.keys, step.cache.values, [3], [step.cache.rows_cap])


def test_the_verify_cost_benchmark_times_each_isa(decode_kernel, tiny_llama_dir, capsys):
    from benchmarks import verify_cost

    argv = ["--model_name_or_path", str(tiny_llama_dir), "--positions", "1,2,5", "--repeat", "2", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        verify_cost.main(verify_cost.parse_args(argv))
    finally:
        torch.set_num_threads(threads)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verify_cost: a verify of 5 positions costs, in plain steps: ours "), last
    assert decode_kernel.f32_isa("auto") == runnable_f32_isas(decode_kernel)[-1]  # left at the best
