"""The k-quant GGUF types (q4_k_m, q5_k_m, q6_k) through llama.cpp's own quantizer, not a re-implementation: llama-cpp-
python's llama_model_quantize (the optional extra, `pip install '.[gguf]'`) when it imports here, else `llama-quantize`
on PATH. It reads our f16 GGUF and picks each tensor's type as llama.cpp's mixes do.

Imports neither gguf nor torch, so it runs in any environment that has llama-cpp-python."""

import ctypes
import importlib.util
import os
import shutil
import subprocess

from alpaca_trainml.cli import UserError

K_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}  # ours -> llama.cpp's name (LLAMA_FTYPE_MOSTLY_*)
SOURCE = "f16"  # what the quantizer reads: llama.cpp's own workflow converts to f16 first
HOW_TO_GET = "pip install '.[gguf]' (llama-cpp-python) or put llama.cpp's llama-quantize on PATH"


def quantizer():
    """'llama_cpp' (llama-cpp-python importable here), the path of llama-quantize, or None."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return "llama_cpp"
    return shutil.which("llama-quantize")


def check(outtype):
    if quantizer() is None:
        raise UserError(f"--outtype {outtype} is made by llama.cpp's own quantizer, not found here: {HOW_TO_GET}")


def quantize(src, dst, outtype, threads=None):
    """llama.cpp's quantizer: src (our f16 GGUF) -> dst as the k-quant mix `outtype`; returns dst."""
    check(outtype)
    name, how, threads = K_QUANTS[outtype], quantizer(), threads or os.cpu_count()
    if how != "llama_cpp":
        run = subprocess.run([how, str(src), str(dst), name, str(threads)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"llama-quantize {name} failed ({run.returncode}): {run.stderr[-2000:]}")
        return dst
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({name}) returned {rc}")
    return dst
