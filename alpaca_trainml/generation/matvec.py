"""Our CPU decode kernels (csrc/decode.cpp), built on first use with torch's extension builder.

Why: a decode step multiplies a few rows by every weight matrix, and on a CPU that is a matrix-vector product, bound
by how fast the weights stream from memory; MKL runs it on one thread at about half the machine's read bandwidth.
And at 135M parameters, the 30-odd small tensor operations per layer around the matmuls cost as much again.
- `matvec(x, w)`: each of torch's threads (OpenMP, torch's own pool) streams one contiguous stretch of the weight's
  rows once for all the input rows (fp32, csrc/f32.cpp: AVX-512 or AVX2 picked at run time, blocks of up to 6 input
  rows by 4 weight rows in registers while the next weight rows are prefetched; bf16: tiles of 64 weight rows, 4
  input rows at a time); fp32 or bf16 weights, fp32 sums. Each output is summed in the same order whatever the
  number of rows, so a row's numbers do not depend on the rows beside it. `f32_isa(name)` picks the fp32
  instructions (auto, generic, avx2, avx512) for benchmarks and tests.
- `LlamaDecoder(weights, ...).step(h, cos, sin, keys, values, positions, slots)`: a whole fp32 or bf16 decode step
  through a Llama-family layer stack (biases, Qwen3's q/k norms, sliding windows) in one call, on those matmuls
  (llama_step.LlamaStep uses it); each row at its position in its cache slot, so a speculative verify runs a draft's
  positions as rows of one step.
Their sums run in another order than MKL's, so outputs differ from F.linear's in the last bits (about 1e-6
relative); tests/test_matvec.py bounds that and tests/test_llama_step.py checks that greedy tokens stay
transformers' own.

Built once per machine kind (AVX2+FMA, or plain C++) and version of the sources under torch's extensions folder
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions): about 30 s with g++. The folder's name carries a hash of
the sources, so two checkouts of different versions (or an upgrade) never rebuild over each other's library.
`make setup` builds it; without a compiler, or with `ALPACA_MATVEC=0`, decoding uses torch's own operations (one
warning says why).

    python -m alpaca_trainml.generation.matvec      # build it now and check it against F.linear
"""

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

ENV = "ALPACA_MATVEC"  # "0": never build or use the kernel
SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"
SOURCES = [SOURCE, SOURCE.with_name("int8.cpp"), SOURCE.with_name("f32.cpp")]  # int8 products (int8.py), fp32 matmul
log = logging.getLogger(__name__)
_lock = threading.Lock()
_built = {}


def variant():
    """(extension name, compiler flags) for this CPU: the AVX2+FMA build where torch itself runs AVX2 or better. The
    name ends with the source's hash: torch's builder keeps one folder per name and rebuilds it whenever another
    source is loaded under that name, so one shared name let a second checkout load the first one's library."""
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES)).hexdigest()[:10]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX2") or capability.startswith("AVX512"):
        return f"alpaca_decode_avx2_{digest}", ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]
    return f"alpaca_decode_generic_{digest}", ["-O3", "-ffp-contract=off", "-fopenmp"]


def kernel():
    """The compiled module (its `matvec(x, w)`), or None when it is switched off or cannot be built here."""
    if os.environ.get(ENV, "1") == "0":
        return None
    with _lock:
        if "module" not in _built:
            _built["module"] = _build()
        return _built["module"]


def _build():
    name, flags = variant()
    try:
        from torch.utils.cpp_extension import load

        log.info("loading the decode kernel %s (the first time builds it: about 30 s)", name)
        return load(name, [str(s) for s in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a read-only cache folder: torch's matmul still works
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("decode kernel not built (%s); decoding uses torch's matmul. Set %s=0 to skip it.", reason, ENV)
        return None


def main():
    module = kernel()
    if module is None:
        raise SystemExit(f"the decode kernel is not available here (switched off by {ENV}=0, or the build failed)")
    torch.manual_seed(0)
    w, x = torch.randn(1000, 576), torch.randn(3, 576)
    err = (module.matvec(x, w) - x @ w.T).abs().max().item()
    print(f"{variant()[0]}: built; largest difference from F.linear on a 3x576 @ 576x1000 product {err:.1e}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
