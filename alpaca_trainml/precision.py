"""Which float type the hardware runs fast: the one rule train.py (--bf16), inference.py and serve.py (--dtype) use.

A CPU with native bf16 (x86 AVX512-BF16 or AMX, Arm's BF16 extension) multiplies bf16 matrices about 4x faster than
fp32; without it, bf16 is emulated and slower than fp32, so it is only worth asking for where the hardware has it.
"""

import functools
from pathlib import Path

import torch

from alpaca_trainml.cli import UsageError

# /proc/cpuinfo flags of bf16 arithmetic in hardware: x86 "flags" and aarch64 "Features" lines
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
DTYPE_CHOICES = ("auto", "bfloat16", "float32", "int8")  # inference.py's, serve.py's and evaluate.py's --dtype
DTYPE_HELP = (
    "the weights' type. auto: bf16 on a GPU or CPU that computes it natively, else float32. Default: bf16 (fp16 on "
    "pre-Ampere GPUs) on a GPU, float32 on a CPU (transformers' exact greedy tokens; bfloat16 decodes about 1.8x "
    "faster on a CPU with our decode kernel, rounding as bf16 does); int8: fp32 weights quantized at load into blocks "
    "of 32 int8 numbers with a scale (llama.cpp's q8_0), decoding about 2x faster than float32 on a CPU"
)


def cpu_flags(cpuinfo=Path("/proc/cpuinfo")):
    """The feature flags of the first CPU in /proc/cpuinfo (Linux); an empty set elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def cpu_bf16_flag():
    """The flag that shows this CPU computes bf16 natively ('avx512_bf16', 'amx_bf16', 'bf16'), or None."""
    flags = cpu_flags()
    found = next((f for f in NATIVE_BF16_FLAGS if f in flags), None)
    if found is None and not flags and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        found = "avx512_bf16"  # no /proc/cpuinfo (macOS, Windows): ask the cpuinfo library torch ships
    return found


def cpu_has_native_bf16():
    """True when the CPU computes bf16 in hardware, so bf16 autocast trains faster than fp32 (2.3-2.6x measured
    here on an AVX512-BF16 CPU with the embedded model)."""
    return cpu_bf16_flag() is not None


def gpu_has_bf16():
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def auto_dtype(device=None):
    """bf16 where the device computes it natively (an Ampere+ GPU, a CPU with AVX512-BF16/AMX), else fp32.
    device: 'cuda...', 'cpu', or None for the GPU if there is one."""
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    native = gpu_has_bf16() if cuda else cpu_has_native_bf16()
    return torch.bfloat16 if native else torch.float32


def resolve_dtype(dtype, device=None):
    """None -> the serving default (bf16, or fp16 on older GPUs; fp32 on CPU, where bf16 generation was not faster);
    'auto' -> auto_dtype(device); a name ('bfloat16', 'float32', ...) -> its torch dtype; a torch dtype as is."""
    if dtype is None:
        cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
        return (torch.bfloat16 if gpu_has_bf16() else torch.float16) if cuda else torch.float32
    if dtype == "auto":
        return auto_dtype(device)
    if isinstance(dtype, str):
        found = getattr(torch, dtype, None)
        if not isinstance(found, torch.dtype) or not found.is_floating_point:  # int8: InstructModel quantizes
            raise UsageError(f"unknown dtype {dtype!r}: give one of {', '.join(DTYPE_CHOICES)}")
        return found
    return dtype


def training_precision(args):
    """How a run with these TrainingArguments trains, for its log line: 'bf16 mixed precision (autocast)', ..."""
    if getattr(args, "bf16", False):
        return "bf16 mixed precision (autocast)"
    if getattr(args, "fp16", False):
        return "fp16 mixed precision"
    return "fp32"
