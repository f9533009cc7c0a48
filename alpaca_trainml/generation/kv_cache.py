"""Key/value cache operations for batched decoding: the static slot cache the Llama step writes in place, and
merge/select over transformers' DynamicCache for the generic step (left-padded rows)."""

import ctypes
import ctypes.util

import torch
import torch.nn.functional as F
from transformers import DynamicCache

GROW = 256  # the slot cache grows in steps of this many positions (and doubles), never per token


def give_back():
    """Return freed memory to the system where the C library is glibc (malloc_trim). glibc keeps freed heap for
    reuse, and once a large block has been freed it serves later large blocks from the heap too: a cache that had
    shrunk still counted in the server's resident memory (a load run kept about 400 MiB of a long answer's cache)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl without it): nothing to trim
        return None


_LIBC = _glibc()


class SlotCache:
    """One preallocated (rows, kv_heads, positions, head_dim) key and value tensor per layer. Row i holds request i
    of the batch from position 0: no padding, each row has its own length (`lens`). It grows by reallocation, rarely:
    positions double, rows grow to what is asked. It shrinks when rows leave and the rest need a quarter of the
    positions or less, and empties with the batch: one long answer's room does not stay with the server (a load run
    with one 4,000-token stream kept 430 MiB more to its end, 2026-12-05)."""

    def __init__(self, layers, kv_heads, head_dim, dtype, device):
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys, self.values = [], []
        self.lens = []  # tokens held by each row (python ints: read every step without a device sync)
        self.rows_cap = self.pos_cap = 0

    def __len__(self):
        return len(self.lens)

    def reserve(self, rows, positions):
        """Room for `rows` rows of `positions` positions each, keeping what is held."""
        if rows <= self.rows_cap and positions <= self.pos_cap:
            return
        new_pos = self.pos_cap if positions <= self.pos_cap else max(positions, 2 * self.pos_cap, GROW)
        self._reallocate(max(rows, self.rows_cap), new_pos)

    def _reallocate(self, new_rows, new_pos):
        """New tensors of new_rows x new_pos (whole GROW steps) holding what the rows hold."""
        new_pos = -(-new_pos // GROW) * GROW
        layers, heads, dim = self.shape
        n, held = len(self.lens), max(self.lens, default=0)

        def moved(old):
            t = torch.zeros(new_rows, heads, new_pos, dim, dtype=self.dtype, device=self.device)
            if old is not None:
                t[:n, :, :held] = old[:n, :, :held]
            return t

        self.keys = [moved(self.keys[i] if self.keys else None) for i in range(layers)]
        self.values = [moved(self.values[i] if self.values else None) for i in range(layers)]
        self.rows_cap, self.pos_cap = new_rows, new_pos

    def _shrink(self):
        held = max(self.lens, default=0)
        if not self.lens and self.keys:
            self.keys, self.values, self.rows_cap, self.pos_cap = [], [], 0, 0
            give_back()
        elif self.pos_cap > GROW and 4 * held <= self.pos_cap:  # a quarter: growing back takes two doublings
            self._reallocate(self.rows_cap, max(2 * held, GROW))
            give_back()

    def add_row(self, length):
        """A new last row that will hold `length` tokens (its prefill writes them); its index."""
        self.reserve(len(self.lens) + 1, length + 1)
        self.lens.append(length)
        return len(self.lens) - 1

    def fill(self, row, keys, values, n):
        """Write the first n positions of row `row` from one (kv_heads, >= n, head_dim) key and value tensor per layer
        (a kept prompt's, prefix_cache.py; a long prompt's own cache row, chunked.py)."""
        for store, given in ((self.keys, keys), (self.values, values)):
            for layer, t in zip(store, given):
                layer[row, :, :n] = t[:, :n]

    def keep(self, rows):
        """Keep only `rows` (indices, in order), moved to the front."""
        if list(rows) == list(range(len(rows))):
            self.lens = self.lens[: len(rows)]
            self._shrink()
            return
        moved = [(to, r) for to, r in enumerate(rows) if to != r]  # only the rows that change place are copied
        dst, src = (torch.tensor(x, device=self.device, dtype=torch.long) for x in zip(*moved))
        held = max(self.lens[r] for _, r in moved)
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :held] = t[src, :, :held]  # advanced indexing copies first: safe in place
        self.lens = [self.lens[r] for r in rows]
        self._shrink()


# --- DynamicCache (transformers' forward on any model): rows are left-padded to a common width -------------
def _kv(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(kv):
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def merge(cache, mask, new_cache, new_mask):
    """One batch from two: rows are left-padded to the longer one (keys/values (batch, heads, seq, dim) with zeros,
    the attention mask (batch, seq) with 0), so that every row's next token goes in the same last column."""
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(t, n):  # n zero steps left of the seq dimension
        return F.pad(t, (0, 0, n, 0))

    a, b = width - mask.shape[1], width - new_mask.shape[1]
    kv = [
        (torch.cat([pad(k1, a), pad(k2, b)]), torch.cat([pad(v1, a), pad(v2, b)]))
        for (k1, v1), (k2, v2) in zip(_kv(cache), _kv(new_cache))
    ]
    return _cache(kv), torch.cat([F.pad(mask, (a, 0)), F.pad(new_mask, (b, 0))])


def select(cache, mask, keep):
    """The rows `keep` (indices), without the columns on the left that are now padding in every row."""
    mask = mask[keep]
    start = int(mask.any(0).nonzero()[0]) if mask.numel() else mask.shape[1]
    return _cache([(k[keep, :, start:], v[keep, :, start:]) for k, v in _kv(cache)]), mask[:, start:]


def left_pad(prompts, pad_id, device):
    """(ids, mask) of token id lists, left-padded to the longest: every row's next token goes in the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask
