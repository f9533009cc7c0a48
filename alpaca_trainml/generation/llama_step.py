"""The model step for the Llama family (Llama with any rope scaling transformers computes, Mistral, Qwen2, Qwen3, and
Phi3 where its rope turns the whole head; SmolLM2 and the tests' tiny models): our own forward over the model's own
weights and a static slot cache.

Why: a batch-1 decode step reads every weight once, so its floor is the memory bandwidth; what transformers' forward
adds per token on a CPU (module calls, cache bookkeeping, mask building) costs about as much again as the matmuls at
135M parameters. A decode step of up to 16 rows on a CPU runs our kernel's LlamaDecoder (matvec.py,
csrc/decode.cpp): the whole layer stack in one call, fp32 or bf16. Prefill, bigger batches, and machines where the
kernel could not be built run the same forward over torch's operations: per layer 2 norms (F.rms_norm: the same
numbers as transformers' module), 4 matmuls (q/k/v and gate/up fused; at decode each runs our kernel's matmul, or a
matmul split across the threads: see Weight), one rotary embedding for queries and keys together (transformers'
formula), an in-place cache write and one sdpa call, as transformers makes it. Greedy tokens are tested equal to
transformers' generate() on every path and for every family (tests/test_llama_step.py).

The families differ only where this forward reads the layer: biases on any projection (Qwen2's q/k/v; Llama's
attention_bias and mlp_bias), an RMSNorm over each query and key head before the rotary embedding (Qwen3), a sliding
window (Mistral, Phi3; Qwen2/Qwen3 layers that use one): a token attends to the last `window` positions, itself
included, as transformers' mask has it; q/k/v and gate/up that come fused in the checkpoint (Phi3), taken as they
are. The rotary embedding is the model's own module (its inverse frequencies and attention scaling: llama3, linear,
yarn, dynamic, longrope...), called for each step's positions, never recomputed here.
"""

import os
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.models.llama.modeling_llama import rotate_half

from alpaca_trainml.generation import int8, matvec
from alpaca_trainml.generation.kv_cache import SlotCache

FAST_ENV = "ALPACA_FAST_DECODE"  # "0": every model takes transformers' forward (the generic step)
# the classes this step runs (Phi3: Phi-3 and Phi-4, with their rope over the whole head)
FAMILIES = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM)
_FUSED = weakref.WeakKeyDictionary()  # first module of a fused group -> (fused weight, its members' data pointers)
SPLIT_MAX_ROWS = 16  # decode steps of up to this many rows take the kernel or the split matmul; prefill takes F.linear


def supports(model):
    """True for a plain transformers model of FAMILIES (not wrapped by PEFT or a quantizer) this forward reproduces
    exactly; Gemma, a Phi whose rope turns part of each head (Phi-4-mini) and the rest keep transformers' forward
    (hf_step.HFStep)."""
    if os.environ.get(FAST_ENV, "1") == "0" or type(model) not in FAMILIES:
        return False
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    plain = getattr(model, "hf_quantizer", None) is None and all(
        type(m) in (nn.Linear, int8.Int8Linear) for layer in model.model.layers for m in _modules(layer)
    )
    whole_rope = 2 * model.model.rotary_emb.inv_freq.numel() == head_dim  # a partial rope: q/k only partly turned
    return plain and whole_rope and getattr(c, "hidden_act", "silu") == "silu" and getattr(c, "pretraining_tp", 1) == 1


def _projections(layer):
    """([q, k, v], o, [gate, up], down) linear layers; Phi3 has q/k/v and gate/up fused already ([qkv], [gate_up])."""
    a, m = layer.self_attn, layer.mlp
    qkv = [a.qkv_proj] if hasattr(a, "qkv_proj") else [a.q_proj, a.k_proj, a.v_proj]
    gate_up = [m.gate_up_proj] if hasattr(m, "gate_up_proj") else [m.gate_proj, m.up_proj]
    return qkv, a.o_proj, gate_up, m.down_proj


def _modules(layer):
    qkv, o, gate_up, down = _projections(layer)
    return [*qkv, o, *gate_up, down]


def _window(config, layer):
    """The layer's sliding window in positions (0: none), as transformers' mask reads it: Qwen2/Qwen3 per layer
    (layer_types), Mistral and Phi3 for every layer (config.sliding_window), Llama never."""
    attn = layer.self_attn
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
    return int(window or 0)


class Weight:
    """A linear layer's weight (and bias), applied as F.linear is, but faster on few rows on a CPU.

    At 1 to 16 rows (decode steps) a matmul is a matrix-vector product, bound by how fast the weight streams from
    memory, and MKL runs it on one thread at about half the machine's read bandwidth. Where our kernel is built
    (matvec.py: fp32 or bf16 weights, each thread streams its own stretch of rows) it takes those steps; its sums
    differ from F.linear's in the last bits. Without it, an fp32 weight is cut into as many blocks of output rows as
    torch has threads, and one batched matmul (bmm, which runs its batches in parallel) gives each thread its block:
    the blocks are a view of the weight (no copy) and each output is F.linear's, bit for bit (tests/test_llama_step.py;
    a bias is added after, which may round apart from F.linear's in the last bit). More rows (prefill) take F.linear."""

    __slots__ = ("full", "bias", "blocks", "n", "kernel")

    def __init__(self, w, kernel=None, bias=None):
        self.full, self.bias, self.blocks, self.kernel = w, bias, None, None
        self.n = n = torch.get_num_threads()
        on_cpu = w.device.type == "cpu"
        kinds = (torch.float32, torch.bfloat16, torch.uint8)  # uint8: int8 blocks (int8.py)
        if kernel is not None and on_cpu and w.dtype in kinds and w.is_contiguous():
            self.kernel = kernel
        elif n > 1 and on_cpu and w.dtype == torch.float32 and w.shape[0] % n == 0:
            self.blocks = w.view(n, w.shape[0] // n, w.shape[1]).transpose(1, 2)  # (n, in, out/n)

    def __call__(self, x):
        rows = x.numel() // x.shape[-1]
        if self.full.dtype == torch.uint8:  # int8 blocks (int8.py)
            return int8.linear(x, self.full, self.bias, self.kernel)
        if rows > SPLIT_MAX_ROWS or (self.kernel is None and self.blocks is None):
            return F.linear(x, self.full, self.bias)
        if self.kernel is not None:
            return self.matvec(x)
        y = torch.bmm(x.reshape(1, rows, -1).expand(self.n, -1, -1), self.blocks)  # (n, rows, out/n)
        y = y.view(*x.shape[:-1], -1) if rows == 1 else y.transpose(0, 1).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def matvec(self, x):
        """The kernel's product for any number of rows (none too): each row's numbers whatever the rows beside it."""
        product = self.kernel.q8_matvec if self.full.dtype == torch.uint8 else self.kernel.matvec  # int8 blocks
        y = product(x.reshape(x.numel() // x.shape[-1], x.shape[-1]).float().contiguous(), self.full)
        y = y if self.bias is None else y + self.bias  # fp32 sums, then one rounding to the model's dtype
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])


def _fused(modules):
    """One weight for the linear layers that read the same input (q, k, v; gate, up): their rows stacked, and each
    layer's weight made a view of its rows (no second copy in memory; the model's own forward reads the same numbers).
    Made once per model: later calls find the views still in place and return the same tensor. One layer (Phi3's
    fused ones): its own weight."""
    if len(modules) == 1:
        return modules[0].weight.data
    weights = [m.weight.data for m in modules]
    made = _FUSED.get(modules[0])
    if made is not None and [w.data_ptr() for w in weights] == made[1]:
        return made[0]
    fused = torch.cat(weights)
    start = 0
    for m, w in zip(modules, weights):
        m.weight.data = fused[start : start + w.shape[0]]
        start += w.shape[0]
    _FUSED[modules[0]] = fused, [m.weight.data_ptr() for m in modules]
    return fused


def _fused_bias(modules):
    """The fused layers' biases stacked as their weights are (zeros for one without), or None when none has one."""
    if all(m.bias is None for m in modules):
        return None
    if len(modules) == 1:
        return modules[0].bias.data
    like = next(m.bias for m in modules if m.bias is not None)  # (an int8 layer's weight is uint8)
    return torch.cat([like.new_zeros(m.out_features) if m.bias is None else m.bias.data for m in modules])


class Layer(NamedTuple):
    """One decoder layer as this step reads it; q_norm/k_norm (head_dim,) are Qwen3's, None elsewhere."""

    ln1: torch.Tensor
    qkv: Weight
    o: Weight
    ln2: torch.Tensor
    gate_up: Weight
    down: Weight
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    window: int  # sliding window in positions; 0: every earlier position

    def kernel_tensors(self, none):
        """What the kernel's LlamaDecoder takes for this layer: 12 tensors, `none` (empty) for an absent one."""
        biases = [w.bias if w.bias is not None else none for w in (self.qkv, self.o, self.gate_up, self.down)]
        norms = [none if t is None else t for t in (self.q_norm, self.k_norm)]
        return [self.ln1, self.qkv.full, self.o.full, self.ln2, self.gate_up.full, self.down.full, *biases, *norms]


def _layer(config, lyr, weight):
    q_norm, k_norm = getattr(lyr.self_attn, "q_norm", None), getattr(lyr.self_attn, "k_norm", None)
    qkv, o, gate_up, down = _projections(lyr)
    return Layer(
        lyr.input_layernorm.weight,
        weight(_fused(qkv), _fused_bias(qkv)),
        weight(o.weight, o.bias),
        lyr.post_attention_layernorm.weight,
        weight(_fused(gate_up), _fused_bias(gate_up)),
        weight(down.weight, down.bias),
        None if q_norm is None else q_norm.weight,
        None if k_norm is None else k_norm.weight,
        _window(config, lyr),
    )


class LlamaStep:
    """prefill(prompts) appends rows and returns their next-token logits; decode(ids) feeds every row one token."""

    def __init__(self, model):
        c = model.config
        self.model = model
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim**-0.5
        quantized = int8.is_quantized(model)  # --dtype int8: the projections are int8 blocks
        k = (int8.kernel() if quantized else matvec.kernel()) if next(model.parameters()).device.type == "cpu" else None

        def weight(w, bias=None):
            return Weight(w, k, bias)

        self.layers = [_layer(c, lyr, weight) for lyr in model.model.layers]
        self.qk = self.heads + self.kv_heads  # query and key heads, first in each row of the fused projection
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens.weight, inner.norm.weight, inner.rotary_emb
        self.eps = c.rms_norm_eps
        self.lm_head = weight(model.lm_head.weight, model.lm_head.bias)
        self.decoder = None  # the whole decode step in one call of our kernel (fp32 or bf16, on a CPU)
        dtype = self.embed.dtype
        if k is not None and dtype in (torch.float32, torch.bfloat16):
            weights = [layer.kernel_tensors(self.embed.new_empty(0)) for layer in self.layers]
            as_asked = [t.dtype == dtype or (quantized and t.dtype == torch.uint8) for layer in weights for t in layer]
            if all(as_asked) and all(t.is_contiguous() for layer in weights for t in layer):  # as the kernel asks
                windows = [layer.window for layer in self.layers]
                self.decoder = k.LlamaDecoder(
                    weights, self.heads, self.kv_heads, self.head_dim, self.eps, self.scale, windows
                )
        self.cache = SlotCache(len(self.layers), self.kv_heads, self.head_dim, self.embed.dtype, self.embed.device)
        # verify() gives decode()'s numbers where the kernel runs both (the same operations per position), and decode's
        # greedy tokens on torch's operations in fp32 only: bf16 rounds activations between layers where the kernel
        # keeps fp32 (a tiny model's greedy text then differed), and int8 keeps fp32 where the kernel rounds to 16 bits
        self.verifies = self.decoder is not None or (dtype == torch.float32 and not quantized)
        self.fuses = self.decoder is not None and dtype == torch.float32 and not quantized  # fused.py takes prompts

    def __len__(self):
        return len(self.cache)

    @torch.inference_mode()
    def keep(self, rows):
        self.cache.keep(rows)

    @torch.inference_mode()
    def prefill(self, prompts):
        """Each prompt alone (batch 1, no padding, causal attention over itself) into a new row; (n, vocab)."""
        logits = []
        for ids in prompts:
            row = self.cache.add_row(len(ids))
            x = torch.tensor([ids], device=self.embed.device)
            positions = torch.arange(len(ids), device=x.device)[None]
            logits.append(self._forward(x, positions, lambda i, k, v, row=row: self._prefill_attn(i, row, k, v)))
        return torch.cat(logits)

    @torch.inference_mode()
    def decode(self, ids):
        """ids: (rows,) the token each row takes next; (rows, vocab) logits for the one after."""
        lens = self.cache.lens
        self.cache.reserve(len(lens), max(lens) + 1)
        pos = torch.tensor(lens, device=ids.device)
        if self.decoder is not None and len(lens) <= SPLIT_MAX_ROWS:
            logits = self.kernel_step(ids, lens, [])
            self.cache.lens = [n + 1 for n in lens]
            return logits
        width = max(lens) + 1
        masks = {w: self._decode_mask(lens, pos, width, w) for w in {layer.window for layer in self.layers}}
        if len(lens) == 1:  # a plain slice write: cheaper than index_put
            at = lens[0]

            def write(store, t):
                store[0, :, at] = t[0, :, 0]
        else:
            rows = torch.arange(len(lens), device=ids.device)

            def write(store, t):
                store[rows, :, pos] = t[:, :, 0]

        def attention(i, k, v):
            return self._decode_attn(i, k, v, write, width, masks[self.layers[i].window])

        logits = self._forward(ids[:, None], pos[:, None], attention)
        self.cache.lens = [n + 1 for n in lens]
        return logits

    def _decode_mask(self, lens, pos, width, window):
        """(rows, 1, 1, width) additive mask for one new token per row at pos (rows,), or None when every row
        attends to every position up to width."""
        if min(lens) == max(lens) and not (window and width > window):
            return None
        return self._band_mask(pos[:, None], width, window)

    def _band_mask(self, pos, width, window):
        """(rows, 1, s, width) additive mask for queries at positions pos (rows, s) over cache columns 0..width-1:
        each attends to its own row up to its own position, and only to the last `window` positions (itself
        included) where the layer has a window, as transformers' sliding-window mask does."""
        cols = torch.arange(width, device=pos.device)
        keep = cols <= pos[..., None]
        if window:
            keep &= cols > pos[..., None] - window
        mask = torch.zeros(keep.shape, dtype=self.embed.dtype, device=pos.device).masked_fill(~keep, float("-inf"))
        return mask[:, None]

    def kernel_step(self, ids, pos, slots, want=None, cache=None):
        """The kernel's step: ids (n,) at positions pos (n ints) of cache rows slots (n ints; [] for rows 0..n-1);
        (n, vocab) logits, or only those of the rows `want` (indices; fused.py: a prompt's last position; [] for
        none). cache: a SlotCache of the same shape to write and read instead of the step's own (chunked.py)."""
        e, cache = F.embedding(ids, self.embed), self.cache if cache is None else cache
        at = torch.tensor(pos, device=ids.device)[:, None]
        cos, sin = (t[:, 0].float().contiguous() for t in self.rotary(e, at))  # in the model's dtype
        h = e.float()  # (n, hidden) fp32, a new tensor the decoder changes in place (bf16 values stay exact)
        self.decoder.step(h, cos, sin, cache.keys, cache.values, pos, slots)
        h = self._norm((h if want is None else h[want]).to(e.dtype), self.norm)
        return self.lm_head.matvec(h) if self.lm_head.kernel is not None else self.lm_head(h)

    @torch.inference_mode()
    def verify(self, tokens, counts=None):
        """tokens (rows, s): each row's next s tokens (the one it was to take next, then a draft of what follows);
        counts: how many of them are real in each row (the rest pad a shorter draft; default all s). Per row, its
        (count, vocab) logits, one per position, as that many decode() calls would give them, in one pass over the
        weights (speculative.py). The kernel runs every real position as one row of its step, in the row's cache
        slot: the numbers of decode(), bit for bit. The cache then holds s tokens of every row (padding included):
        rewind() takes back those not accepted."""
        lens, (rows, s), dev = self.cache.lens, tokens.shape, tokens.device
        counts = [s] * rows if counts is None else list(counts)
        self.cache.reserve(rows, max(lens) + s)
        if self.decoder is not None:
            slots = [r for r, c in enumerate(counts) for _ in range(c)]
            pos = [lens[r] + j for r, c in enumerate(counts) for j in range(c)]
            logits = self.kernel_step(torch.cat([tokens[r, :c] for r, c in enumerate(counts)]), pos, slots)
            self.cache.lens = [n + s for n in lens]
            return list(logits.split(counts))
        pos = torch.tensor(lens, device=dev)[:, None] + torch.arange(s, device=dev)  # (rows, s)
        width = max(lens) + s
        masks = {w: self._band_mask(pos, width, w) for w in {layer.window for layer in self.layers}}  # causal per row
        index = torch.arange(rows, device=dev)[:, None]

        def attention(i, k, v):  # k, v (rows, kv_heads, s, dim) into each row's positions pos
            keys, values = self.cache.keys[i], self.cache.values[i]
            keys[index, :, pos], values[index, :, pos] = k.transpose(1, 2), v.transpose(1, 2)
            keys, values = keys[:rows, :, :width], values[:rows, :, :width]
            return lambda q: F.scaled_dot_product_attention(
                q, keys, values, attn_mask=masks[self.layers[i].window], scale=self.scale, enable_gqa=True
            )

        logits = self._forward(tokens, pos, attention, last_only=False)
        self.cache.lens = [n + s for n in lens]
        return [row[:c] for row, c in zip(logits, counts)]

    def rewind(self, drop):
        """Forget the last drop[r] tokens of each row r (a draft's rejected tail): later steps write over them."""
        self.cache.lens = [n - d for n, d in zip(self.cache.lens, drop)]

    def _prefill_attn(self, i, row, k, v):
        window = self.layers[i].window

        def attend(q):
            n = k.shape[2]
            self.cache.keys[i][row, :, :n] = k[0]
            self.cache.values[i][row, :, :n] = v[0]
            if window and n > window:  # a sliding window the prompt is longer than: causal and banded
                at = torch.arange(n, device=q.device)
                band = (at[None, :] <= at[:, None]) & (at[None, :] > at[:, None] - window)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=self.scale, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)

        return attend

    def _decode_attn(self, i, k, v, write, width, mask):
        keys, values = self.cache.keys[i], self.cache.values[i]
        write(keys, k)
        write(values, v)
        n = k.shape[0]
        keys, values = keys[:n, :, :width], values[:n, :, :width]

        def attend(q):  # q (rows, heads, 1, dim); one fused kernel, as transformers' sdpa attention calls it
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)

        return attend

    def _forward(self, x, positions, attention, last_only=True):
        """x (batch, seq) ids -> (batch, vocab) logits of the last position (all: (batch, seq, vocab));
        attention(i, k, v) -> attend(q)."""
        b, s = x.shape
        h = F.embedding(x, self.embed)
        cos, sin = (t[:, None] for t in self.rotary(h, positions))  # (batch, 1, seq, dim)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(h, layer.ln1)).view(b, s, -1, self.head_dim)
            if layer.q_norm is not None:  # Qwen3: each query and key head normed over head_dim, before the rotary
                qk = qkv[:, :, : self.qk]
                qkv = torch.cat(
                    [self._norm(qk[:, :, : self.heads], layer.q_norm), self._norm(qk[:, :, self.heads :], layer.k_norm)]
                    + [qkv[:, :, self.qk :]],
                    dim=2,
                )
            qkv = qkv.transpose(1, 2)
            # queries and keys rotate together: one rotary embedding, not two (the same arithmetic per head)
            qk, v = qkv[:, : self.qk], qkv[:, self.qk :]
            qk = qk * cos + rotate_half(qk) * sin
            o = attention(i, qk[:, self.heads :], v)(qk[:, : self.heads])  # (batch, heads, seq, dim)
            h = h + layer.o(o.transpose(1, 2).reshape(b, s, -1))
            gate, up = layer.gate_up(self._norm(h, layer.ln2)).chunk(2, -1)
            h = h + layer.down(F.silu(gate) * up)
        return self.lm_head(self._norm(h[:, -1] if last_only else h, self.norm))

    def _norm(self, h, weight):
        """transformers' LlamaRMSNorm in 2 operations instead of 7 (fp32 math, then the weight in the model's dtype);
        the same numbers, bit for bit (tests/test_llama_step.py)."""
        if h.dtype == torch.float32:
            return F.rms_norm(h, (h.shape[-1],), None, self.eps) * weight
        return F.rms_norm(h.float(), (h.shape[-1],), None, self.eps).to(h.dtype) * weight
