"""export/quantize.py: the block types of gguf's own quantizers (q4_0, q4_1, q5_0, q5_1) on the tiny Llama, read back
and dequantized with gguf's reader; a matrix whose rows do not split into blocks; and a k-quant asked for where no
llama.cpp quantizer is installed."""

import gguf
import numpy as np
import pytest
import torch
import transformers
from test_export_gguf import field

from alpaca_trainml.cli import UserError
from alpaca_trainml.export import kquants, quantize
from alpaca_trainml.export.gguf import export

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).state_dict()


def worst_error(path, hf):
    """(type of blk.0.ffn_down, its largest error relative to the tensor's largest weight)."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    t, want = tensors["blk.0.ffn_down.weight"], hf["model.layers.0.mlp.down_proj.weight"].numpy()
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
    return t.tensor_type, float(np.abs(got - want).max() / np.abs(want).max())


def test_q4_and_q5_block_types_round_trip_within_their_step(tiny_llama_dir, tmp_path, hf):
    errors = {}
    for outtype, qtype in (("q4_0", Q.Q4_0), ("q4_1", Q.Q4_1), ("q5_0", Q.Q5_0), ("q5_1", Q.Q5_1)):
        out = export(tiny_llama_dir, tmp_path / f"tiny-{outtype}.gguf", outtype)
        got_type, errors[outtype] = worst_error(out, hf)
        assert got_type == qtype and field(gguf.GGUFReader(out), "general.file_type") == quantize.file_type(outtype)
        head = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}["output.weight"]
        assert head == Q.Q8_0  # the logits' matrix keeps 8 bits, as llama.cpp's quantizer keeps 6 to 8
    # q4_0/q5_0: step = the block's largest |w| / 8 (/ 16), and the side opposite that weight is one step short, so
    # one step at most; q4_1/q5_1: 15 (31) steps from min to max (at most 2 x largest |w|), half a step at most
    assert 0 < errors["q4_0"] <= 1 / 8 and 0 < errors["q4_1"] <= 1 / 15
    assert 0 < errors["q5_0"] <= 1 / 16 and 0 < errors["q5_1"] <= 1 / 31
    assert errors["q5_0"] < errors["q4_0"] and errors["q5_1"] < errors["q4_1"]


def test_rows_that_do_not_split_into_blocks_stay_f16_and_vectors_f32():
    data, raw = quantize.tensor_data("x", np.ones((4, 40), dtype=np.float32), "q4_0")  # 40 is not a multiple of 32
    assert raw is None and data.dtype == np.float16
    data, raw = quantize.tensor_data("norm", np.ones(64, dtype=np.float32), "q5_1")
    assert raw is None and data.dtype == np.float32


def test_a_k_quant_without_llama_cpps_quantizer_says_how_to_get_it_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(kquants, "quantizer", lambda: None)
    with pytest.raises(UserError) as e:
        export(tmp_path / "not-even-loaded", tmp_path / "x.gguf", "q4_k_m")
    assert "\n" not in str(e.value) and "pip install '.[gguf]'" in str(e.value) and "llama-quantize" in str(e.value)
    with pytest.raises(UserError, match="choose one of f32, f16, bf16, q8_0, q4_0.*q6_k"):
        export(tmp_path, tmp_path / "x.gguf", "q3_k")
