"""Prompts longer than fused.BUDGET new positions, prefilled BUDGET positions a step while the batch decodes (chunked
prefill, as vLLM's scheduler cuts long prompts).

Why: a prompt's prefill is compute, about 1 ms a position for SmolLM2-135M on 2 cores. Prefilled in one go (batch.py
did this for prompts over the budget), a 2,000-token prompt held every running stream for some 2 s. Here each step
of the batch also prefills the next BUDGET positions of the first long prompt waiting, so the running rows wait at
most one chunk a step; once its last chunk is in, the prompt joins the batch as a new row, as a fused prompt does.

Each long prompt fills a one-row cache of its own (kv_cache.SlotCache, the batch's shape) through the same kernel
step as fused.py, a chunk at a time: each position's numbers are the kernel's whatever else is in the pass, so the
prompt gets the logits and keys a fused prefill gives it, bit for bit (tests/test_chunked.py). It starts from a kept
prefix where the prefix cache has one (prefix_cache.py), and is kept there once in. Its keys and values are copied
into the batch's cache when it joins (46 KB a position for SmolLM2-135M in fp32). Only steps that fuse (our kernel
over fp32 weights) cut prompts; the others prefill long prompts apart, in one go, as before.
"""

import torch

from alpaca_trainml.generation import fused
from alpaca_trainml.generation.kv_cache import SlotCache


class Filling:
    """One long prompt on its way into the batch: its job, its own cache row, and how many positions are in."""

    def __init__(self, job, stepper, prefixes=None):
        self.job, shape = job, stepper.cache.shape
        self.cache = SlotCache(*shape, stepper.cache.dtype, stepper.cache.device)
        self.cache.add_row(len(job.ids))
        self.done, key = prefixes.match(job.ids) if prefixes is not None else (0, None)
        if self.done:
            prefixes.load(self.cache, 0, key, self.done)
            job.cached = self.done

    @torch.inference_mode()
    def advance(self, stepper):
        """Prefill the next chunk of up to fused.BUDGET positions; after the last one, the (1, vocab) logits of the
        prompt's first new token, else None."""
        ids = self.job.ids
        end = min(self.done + fused.BUDGET, len(ids))
        last = [end - self.done - 1] if end == len(ids) else []  # only the last position's logits are read
        tokens = torch.tensor(ids[self.done : end], dtype=torch.long)
        logits = stepper.kernel_step(tokens, list(range(self.done, end)), [0] * len(tokens), last, self.cache)
        self.done = end
        return logits if last else None

    def join(self, cache):
        """Copy the prompt's keys and values into a new last row of the batch's cache; its index."""
        n = len(self.job.ids)
        row = cache.add_row(n)
        cache.fill(row, [t[0] for t in self.cache.keys], [t[0] for t in self.cache.values], n)
        return row
