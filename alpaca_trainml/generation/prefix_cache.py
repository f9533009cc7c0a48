"""Prompt prefixes kept for the next prompt that starts the same way (automatic prefix caching, as vLLM's and
llama.cpp's servers keep them).

Why: the prompts a server sees share their openings. Every Alpaca prompt starts with the same preamble, every chat
with its template's system turn, and clients repeat whole prompts (a retry, several samples of one question). A
prompt's keys and values at its first n positions depend on those n tokens alone, so a new prompt that starts with
n tokens of a kept one copies them into its cache row and prefills only the rest. Copying 60 positions of
SmolLM2-135M's cache moves 2.8 MB; prefilling them costs 13 GFLOP.

What is kept: after a fused pass (fused.py), each new prompt's keys and values, as our kernel wrote them, up to
DEFAULT_MB of them (`--prefix_cache_mb` on serve.py), the least recently used leaving first. The kernel computes
each position's numbers the same whatever else is in the pass (csrc/decode.cpp), so a prompt that reuses a prefix
gets the numbers it would have got prefilled in full, bit for bit (tests/test_prefix_cache.py). Long prompts, cut
into chunks (chunked.py), use it and are kept too; prompts prefilled apart (bf16, LoRA rows, int8 prompts of more
than fused.INT8_BUDGET new positions) neither use nor fill it.
The cache lives with its batch (batch.DecodeBatch): serve.py's one engine keeps it while it serves; each
InstructModel.generate call has its own, so weights changed between calls (training) never meet old keys.
"""

from collections import OrderedDict

import numpy as np
import torch

DEFAULT_MB = 256  # room for keys and values: SmolLM2-135M in fp32 takes 46 KB a position (5,800 positions)
HELP = (
    "MiB of prompt keys and values kept for later prompts that start the same way (automatic prefix caching); "
    f"0 turns it off (default {DEFAULT_MB})"
)


def common_length(a, b):
    """How many leading tokens two id arrays share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


class PrefixCache:
    """Kept prompts (their ids) -> their keys and values (layers, kv_heads, positions, head_dim), one tensor each."""

    def __init__(self, budget_bytes):
        self.budget, self.bytes = budget_bytes, 0
        self.entries = OrderedDict()  # tuple(ids) -> (ids as an array, keys, values); the last used last
        self.queried = self.reused = 0  # prompt tokens of the prompts that came here, and those copied from here

    def match(self, ids):
        """(n, key): the longest kept prefix of `ids`, at most len(ids) - 1 tokens (the last one is computed: its
        logits pick the first new token); (0, None) when none starts the same way."""
        query, best, key = np.asarray(ids), 0, None
        for k, (kept, _, _) in self.entries.items():
            n = common_length(kept, query)
            if n > best:
                best, key = n, k
        best = min(best, len(ids) - 1)
        return (best, key) if best > 0 else (0, None)

    def load(self, cache, row, key, n):
        """Copy the kept prompt `key`'s first n positions into row `row` of a kv_cache.SlotCache."""
        _, keys, values = self.entries[key]
        self.reused += n
        self.entries.move_to_end(key)
        cache.fill(row, keys, values, n)

    def store(self, cache, row, ids):
        """Keep the keys and values of prompt `ids`, held at positions 0..len(ids)-1 of the cache's row `row`; a
        kept prompt that this one starts with leaves (this one holds it all)."""
        key = tuple(ids)
        self.queried += len(ids)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        n = len(ids)
        keys = torch.stack([t[row, :, :n] for t in cache.keys])  # (layers, kv_heads, n, dim): a copy
        values = torch.stack([t[row, :, :n] for t in cache.values])
        size = 2 * keys.numel() * keys.element_size()
        if size > self.budget:
            return
        query = np.asarray(ids)
        for k in [k for k, (kept, _, _) in self.entries.items() if len(kept) < n and self._starts(query, kept)]:
            self._drop(k)
        self.entries[key] = (query, keys, values)
        self.bytes += size
        while self.bytes > self.budget:
            self._drop(next(iter(self.entries)))

    @staticmethod
    def _starts(ids, kept):
        return common_length(kept, ids) == len(kept)

    def _drop(self, key):
        _, keys, values = self.entries.pop(key)
        self.bytes -= 2 * keys.numel() * keys.element_size()
