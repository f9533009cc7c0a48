"""The generic model step: transformers' forward() and DynamicCache, for any causal LM (and a PEFT-wrapped one, as
train.py's demo answers use while LoRA trains). Rows are left-padded to a common width; a new row's cache is merged
in, a finished row's taken out (kv_cache.merge/select)."""

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from alpaca_trainml.generation.kv_cache import left_pad, merge, select


class HFStep:
    """prefill(prompts) appends rows and returns their next-token logits; decode(ids) feeds every row one token."""

    def __init__(self, model, pad_id):
        self.model, self.pad_id = model, pad_id
        # transformers 5.24 renamed forward()'s past_key_values to cache (the old name goes in 5.40, and warns until
        # then). A PEFT model's forward takes **kwargs and hands them on: ask the model underneath.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(type(inner).forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = self.mask = None

    def __len__(self):
        return 0 if self.mask is None else self.mask.shape[0]

    @torch.inference_mode()
    def keep(self, rows):
        if not rows:
            self.cache = self.mask = None
        elif list(rows) != list(range(len(self))):
            self.cache, self.mask = select(self.cache, self.mask, torch.tensor(rows, device=self.mask.device))

    @torch.inference_mode()
    def prefill(self, prompts):
        ids, mask = left_pad(prompts, self.pad_id, self.model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()  # filled in place by forward()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: (batch, 1, vocab), not (batch, seq, vocab)
            **{self.cache_arg: cache},
        )
        if self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            self.cache, self.mask = merge(self.cache, self.mask, cache, mask)
        return out.logits[:, -1]

    @torch.inference_mode()
    def decode(self, ids):
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.mask.sum(-1, keepdim=True) - 1  # real tokens before the new one
        out = self.model(
            input_ids=ids[:, None],
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        return out.logits[:, -1]
