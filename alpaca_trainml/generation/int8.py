"""int8 weights (`--dtype int8`): a checkpoint's linear layers quantized at load into blocks of 32 int8 numbers with
one fp16 scale each (llama.cpp's q8_0 numbers), decoded by our kernel (csrc/int8.cpp) about twice as fast as fp32.

Why: a batch-1 decode step reads every weight once, so it runs at the memory bandwidth; 1.06 bytes per weight
instead of 4 reads about a quarter of the bytes. The kernel rounds each input row to 16-bit integers in blocks of 32
(an fp32 scale each) and sums int8 weight x 16-bit input per block exactly (AVX512-VNNI, AVX-VNNI or AVX2, chosen from
the CPU's flags; plain C++ elsewhere). llama.cpp's q8_0 rounds the input rows to 8 bits; that, not the weights, moved
greedy tokens and perplexity away from fp32 (docs/decode-kernel.md), and the 16 bits cost next to nothing where the
step waits on memory.

- `quantize_model(model)`: every projection of a decoder layer and the output layer (lm_head) become Int8Linear:
  one uint8 tensor per weight, packed (out, in + in / 16): each row's int8 numbers, then its fp16 scales. The fp32
  weights are freed; the embedding stays fp32 (a tied lm_head gets its own int8 copy). SmolLM2-135M: 538 MB -> 256 MB.
- A decode step (1-16 rows) runs the int8 products; prefill and bigger batches dequantize one weight at a time to fp32
  and run F.linear on it (the same int8 model, with fp32 activations), so no fp32 copy of the weights is kept.
- `ALPACA_INT8_KERNEL=generic|avx2|avxvnni|avx512vnni` forces one instruction set (default auto: the best this CPU
  has); the tests run the plain C++ one this way. Two more, for comparison only: `avx512vnni8` (8-bit input rows,
  llama.cpp's q8_0 x q8_0) and `avx512f32` (fp32 input rows, the weights widened to fp32).
"""

import ctypes
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from alpaca_trainml.cli import UsageError
from alpaca_trainml.generation import matvec

BLOCK = 32  # weights per fp16 scale, as llama.cpp's q8_0
ISA_ENV = "ALPACA_INT8_KERNEL"  # auto (default), generic, avx2, avxvnni, avx512vnni; avx512vnni8, avx512f32
log = logging.getLogger(__name__)
_in_use = {}  # "isa": the instructions the kernel was last set to


def quantize(w):
    """(out, in) float weight -> (out, in + in / 16) uint8: per row the int8 numbers q, then one fp16 scale d per
    block of 32 (d = max|w| / 127, rounded to fp16 first; q = round(w / d)), so that w ~= q * d."""
    out, n = w.shape
    if n % BLOCK:
        raise ValueError(f"int8: in_features {n} is not a multiple of {BLOCK}")
    blocks = w.detach().float().reshape(out, n // BLOCK, BLOCK)
    d = (blocks.abs().amax(-1) / 127).half()
    inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round(blocks * inv[..., None]).clamp_(-127, 127).to(torch.int8).reshape(out, n)
    return torch.cat([q.view(torch.uint8), d.view(torch.uint8)], dim=1).contiguous()


def in_features(packed):
    return packed.shape[1] * 16 // 17


def dequantize(packed):
    """The fp32 weight (out, in) a packed one stands for."""
    out, n = packed.shape[0], in_features(packed)
    q = packed[:, :n].view(torch.int8).float().view(out, n // BLOCK, BLOCK)
    d = packed[:, n:].contiguous().view(torch.float16).float()
    return (q * d[..., None]).view(out, n)


def kernel():
    """The compiled decode kernel with its int8 instructions set from ALPACA_INT8_KERNEL, or None (matvec.kernel)."""
    k = matvec.kernel()
    if k is not None:
        want = os.environ.get(ISA_ENV, "auto")
        try:
            _in_use["isa"] = k.q8_isa(want)
        except RuntimeError as e:
            raise UsageError(f"{ISA_ENV}={want}: {str(e).splitlines()[0]}") from None
    return k


def instructions():
    """The instructions the int8 products run on ('avx512vnni', 'avxvnni', 'avx2', 'generic', or one forced for
    comparison), or None before the kernel is loaded."""
    return _in_use.get("isa")


def linear(x, packed, bias=None, k=None):
    """F.linear(x, dequantize(packed), bias): with the kernel `k` on up to 16 rows (16-bit input rows, as decode runs
    it), else through a dequantized fp32 copy of this one weight."""
    rows = x.numel() // x.shape[-1]
    if k is not None and rows <= 16:
        y = k.q8_matvec(x.reshape(rows, -1).float().contiguous(), packed).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x.float(), dequantize(packed))
    y = y if bias is None else y + bias
    return y.to(x.dtype)


class Int8Linear(nn.Module):
    """nn.Linear with its weight in int8 blocks: `weight` is the packed uint8 tensor (a buffer, not trained)."""

    def __init__(self, linear_layer):
        super().__init__()
        self.in_features, self.out_features = linear_layer.in_features, linear_layer.out_features
        self.register_buffer("weight", quantize(linear_layer.weight))
        self.bias = linear_layer.bias

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def quantizable(module):
    return type(module) is nn.Linear and module.in_features % BLOCK == 0 and module.weight.device.type == "cpu"


def quantize_model(model):
    """Turn the decoder layers' linear layers and lm_head into Int8Linear, in place (CPU, fp32 models); returns the
    number of bytes the weights took before and after. A layer whose in_features is not a multiple of 32 stays fp32."""
    if next(model.parameters()).device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
        raise UsageError("--dtype int8 runs on a CPU, from an fp32 load: leave --dtype int8 off on a GPU")
    before = _bytes(model.parameters())
    targets = [(name, m) for name, m in model.named_modules() if quantizable(m) and ".layers." in f".{name}"]
    head = getattr(model, "lm_head", None)
    if head is not None and quantizable(head):
        targets.append(("lm_head", head))
    for name, m in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, Int8Linear(m))
    for p in model.parameters():  # own copies: a view into the checkpoint's mapped file kept all of it resident
        p.data = p.data.clone()
    _trim()
    after = _bytes([*model.parameters(), *model.buffers()])
    log.info("int8: %d linear layers quantized, weights %.0f MB -> %.0f MB", len(targets), before / 1e6, after / 1e6)
    return before, after


def _trim():
    """Give the freed fp32 weights back to the system: glibc keeps freed memory in its heap, and the process's memory
    stayed at about the fp32 size without this (measured 2026-12-05). Elsewhere than glibc: nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def is_quantized(model):
    return any(isinstance(m, Int8Linear) for m in model.modules())
