"""Attention over examples laid end to end in one row: causal attention within each example, nothing across.

Why: train.py's padding-free batches used to pack a micro-batch into rows of up to model_max_length tokens, padded to
the longest, with a block-diagonal mask. The padding still went through every layer (18% of positions on the first
real Alpaca micro-batch of 8), and attention ran over every row's full width, masked or not. Here the whole
micro-batch is one row with no padding at all: the linear layers see exactly the examples' tokens, and attention
runs once per example (sdpa, is_causal), so its cost is the sum of the squared example lengths, as flash-attention's
varlen kernel gives on a GPU. It is the same arithmetic as the mask (each query attends to the keys of its own
example up to itself).

How: registered with transformers as the attention implementation SEGMENTS. A forward that passes
`segment_lengths` (a tuple of ints, the collator's) takes the per-example path; any other call (evaluation with the
padded collator, the demo's generation) is transformers' own sdpa attention, mask and all.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from alpaca_trainml.data.collators import SEGMENT_KWARG as KWARG
from alpaca_trainml.data.collators import SEGMENTS


def segment_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (1, heads, length, dim), key/value (1, kv heads, length, dim) -> ((1, length, heads, dim), None)."""
    lengths = kwargs.get(KWARG)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise ValueError(f"{KWARG} {tuple(lengths)} do not cover the row of {tuple(query.shape)}")
    dropout = dropout if module.training else 0.0
    gqa = query.shape[1] != key.shape[1]
    outs, start = [], 0
    for n in lengths:
        end = start + n
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
        start = end
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENTS, segment_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENTS, sdpa_mask)  # the fallback needs sdpa's masks


def use_segments(model):
    """Switch a model that runs sdpa attention to SEGMENTS (the same numbers where no segments are passed). True if
    it did; PEFT-wrapped models are switched through their base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    base.set_attn_implementation(SEGMENTS)
    return True


def restore_sdpa(model):
    """Back to transformers' sdpa (before saving, or handing the model to anything else)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) == SEGMENTS:
        base.set_attn_implementation("sdpa")
