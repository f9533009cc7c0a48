"""GGUF weight types we write tensor by tensor: f32, f16, bf16 and the block types of gguf's own quantizers (q8_0,
q4_0, q4_1, q5_0, q5_1). The k-quants are llama.cpp's quantizer run on our f16 file (kquants.py)."""

import logging

import gguf
import numpy as np

from alpaca_trainml.cli import UserError
from alpaca_trainml.export import kquants

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
GGUF_TYPES = {  # written by us, tensor by tensor
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
}
OUTTYPES = [*GGUF_TYPES, *kquants.K_QUANTS]  # the k-quants: llama.cpp's mixes, made by its quantizer (kquants.py)


def check_outtype(outtype):
    """UserError for an unknown type, or for a k-quant with no llama.cpp quantizer here (before any model loads)."""
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if outtype in kquants.K_QUANTS:
        kquants.check(outtype)


def file_type(outtype):
    return GGUF_TYPES[outtype][1]


HEAD_TYPE = "q8_0"  # the output matrix under a 4/5-bit type, as llama.cpp's quantizer keeps it at 6 to 8 bits


def tensor_data(name, w, outtype, head=False):
    """(numpy data, raw dtype or None) for a float32 numpy array: 1-D tensors (norms, biases, rope factors) stay f32,
    as llama.cpp expects; a matrix whose rows do not split into the type's blocks is written as f16. head: the matrix
    that makes the logits (output, or token_embd when tied), which a 4/5-bit type writes as q8_0."""
    if head and outtype.startswith(("q4", "q5")):
        outtype = HEAD_TYPE
    qtype = GGUF_TYPES[outtype][0]
    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        logger.warning("%s: rows of %d do not split into %s blocks; written as f16", name, w.shape[-1], outtype)
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype
