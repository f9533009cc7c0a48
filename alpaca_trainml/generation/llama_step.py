"""The model step for Llama-architecture checkpoints (SmolLM2, Llama, the tests' tiny Llama): our own forward over
the model's own weights and a static slot cache.

Why: a batch-1 decode step reads every weight once, so its floor is the memory bandwidth; what transformers' forward
adds per token on a CPU (module calls, cache bookkeeping, mask building) costs about as much again as the matmuls at
135M parameters. A decode step of up to 16 rows on a CPU runs our kernel's LlamaDecoder (matvec.py,
csrc/decode.cpp): the whole layer stack in one call, fp32 or bf16. Prefill, bigger batches, and machines where the
kernel could not be built run the same forward over torch's operations: per layer 2 norms (F.rms_norm: the same
numbers as transformers' module), 4 matmuls (q/k/v and gate/up fused; at decode each runs our kernel's matmul, or a
matmul split across the threads: see Weight), one rotary embedding for queries and keys together (transformers'
formula), an in-place cache write and one sdpa call, as transformers makes it. Greedy tokens are tested equal to
transformers' generate() on every path (tests/test_llama_step.py).
"""

import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM, rotate_half

from alpaca_trainml.generation import matvec
from alpaca_trainml.generation.kv_cache import SlotCache

FAST_ENV = "ALPACA_FAST_DECODE"  # "0": every model takes transformers' forward (the generic step)
_FUSED = weakref.WeakKeyDictionary()  # first module of a fused group -> (fused weight, its members' data pointers)
SPLIT_MAX_ROWS = 16  # decode steps of up to this many rows take the kernel or the split matmul; prefill takes F.linear


def supports(model):
    """True for a plain transformers Llama (not wrapped by PEFT or a quantizer) this forward reproduces exactly."""
    if os.environ.get(FAST_ENV, "1") == "0" or type(model) is not LlamaForCausalLM:
        return False
    c = model.config
    plain = getattr(model, "hf_quantizer", None) is None and all(
        type(m) is nn.Linear for layer in model.model.layers for m in (*_attn(layer), *_mlp(layer))
    )
    return (
        plain
        and not getattr(c, "attention_bias", False)
        and not getattr(c, "mlp_bias", False)
        and getattr(c, "hidden_act", "silu") == "silu"
        and getattr(c, "pretraining_tp", 1) == 1
    )


def _attn(layer):
    a = layer.self_attn
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj


def _mlp(layer):
    m = layer.mlp
    return m.gate_proj, m.up_proj, m.down_proj


class Weight:
    """A linear layer's weight, applied as F.linear is, but faster on few rows on a CPU.

    At 1 to 16 rows (decode steps) a matmul is a matrix-vector product, bound by how fast the weight streams from
    memory, and MKL runs it on one thread at about half the machine's read bandwidth. Where our kernel is built
    (matvec.py: fp32 or bf16 weights, each thread streams its own stretch of rows) it takes those steps; its sums
    differ from F.linear's in the last bits. Without it, an fp32 weight is cut into as many blocks of output rows as
    torch has threads, and one batched matmul (bmm, which runs its batches in parallel) gives each thread its block:
    the blocks are a view of the weight (no copy) and each output is F.linear's, bit for bit
    (tests/test_llama_step.py). More rows (prefill) take F.linear."""

    __slots__ = ("full", "blocks", "n", "kernel")

    def __init__(self, w, kernel=None):
        self.full, self.blocks, self.kernel = w, None, None
        self.n = n = torch.get_num_threads()
        on_cpu = w.device.type == "cpu"
        if kernel is not None and on_cpu and w.dtype in (torch.float32, torch.bfloat16) and w.is_contiguous():
            self.kernel = kernel
        elif n > 1 and on_cpu and w.dtype == torch.float32 and w.shape[0] % n == 0:
            self.blocks = w.view(n, w.shape[0] // n, w.shape[1]).transpose(1, 2)  # (n, in, out/n)

    def __call__(self, x):
        rows = x.numel() // x.shape[-1]
        if rows > SPLIT_MAX_ROWS or (self.kernel is None and self.blocks is None):
            return F.linear(x, self.full)
        if self.kernel is not None:
            y = self.kernel.matvec(x.reshape(rows, -1).float().contiguous(), self.full)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        y = torch.bmm(x.reshape(1, rows, -1).expand(self.n, -1, -1), self.blocks)  # (n, rows, out/n)
        return y.view(*x.shape[:-1], -1) if rows == 1 else y.transpose(0, 1).reshape(*x.shape[:-1], -1)


def _fused(modules):
    """One weight for the linear layers that read the same input (q, k, v; gate, up): their rows stacked, and each
    layer's weight made a view of its rows (no second copy in memory; the model's own forward reads the same numbers).
    Made once per model: later calls find the views still in place and return the same tensor."""
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


class LlamaStep:
    """prefill(prompts) appends rows and returns their next-token logits; decode(ids) feeds every row one token."""

    def __init__(self, model):
        c = model.config
        self.model = model
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim**-0.5
        k = matvec.kernel() if next(model.parameters()).device.type == "cpu" else None

        def weight(w):
            return Weight(w, k)

        self.layers = [
            (lyr.input_layernorm.weight, weight(_fused(_attn(lyr)[:3])), weight(lyr.self_attn.o_proj.weight))
            + (lyr.post_attention_layernorm.weight, weight(_fused(_mlp(lyr)[:2])), weight(lyr.mlp.down_proj.weight))
            for lyr in model.model.layers
        ]
        self.qk = self.heads + self.kv_heads  # query and key heads, first in each row of the fused projection
        self.embed, self.norm, self.rotary = (
            model.model.embed_tokens.weight,
            model.model.norm.weight,
            model.model.rotary_emb,
        )
        self.eps = c.rms_norm_eps
        self.lm_head = weight(model.lm_head.weight)
        self.decoder = None  # the whole decode step in one call of our kernel (fp32 or bf16, on a CPU)
        weights = [[ln1, wqkv.full, wo.full, ln2, wgu.full, wd.full] for ln1, wqkv, wo, ln2, wgu, wd in self.layers]
        dtype = self.embed.dtype
        if k is not None and dtype in (torch.float32, torch.bfloat16):
            if all(t.dtype == dtype and t.is_contiguous() for layer in weights for t in layer):  # as the kernel asks
                self.decoder = k.LlamaDecoder(weights, self.heads, self.kv_heads, self.head_dim, self.eps, self.scale)
        self.cache = SlotCache(len(self.layers), self.kv_heads, self.head_dim, self.embed.dtype, self.embed.device)

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
            e = F.embedding(ids, self.embed)
            cos, sin = (t[:, 0].float().contiguous() for t in self.rotary(e, pos[:, None]))  # in the model's dtype
            h = e.float()  # (rows, hidden) fp32, a new tensor the decoder changes in place (bf16 values stay exact)
            self.decoder.step(h, cos, sin, self.cache.keys, self.cache.values, lens)
            self.cache.lens = [n + 1 for n in lens]
            return self.lm_head(self._norm(h.to(e.dtype), self.norm))
        width = max(lens) + 1
        mask = None
        if min(lens) != max(lens):  # rows of different lengths: each attends to its own positions only
            dtype = self.embed.dtype
            mask = torch.arange(width, device=ids.device)[None, :] <= pos[:, None]
            mask = torch.zeros(mask.shape, dtype=dtype, device=ids.device).masked_fill(~mask, float("-inf"))
            mask = mask[:, None, None, :]
        if len(lens) == 1:  # a plain slice write: cheaper than index_put
            at = lens[0]

            def write(store, t):
                store[0, :, at] = t[0, :, 0]
        else:
            rows = torch.arange(len(lens), device=ids.device)

            def write(store, t):
                store[rows, :, pos] = t[:, :, 0]

        def attention(i, k, v):
            return self._decode_attn(i, k, v, write, width, mask)

        logits = self._forward(ids[:, None], pos[:, None], attention)
        self.cache.lens = [n + 1 for n in lens]
        return logits

    def _prefill_attn(self, i, row, k, v):
        def attend(q):
            n = k.shape[2]
            self.cache.keys[i][row, :, :n] = k[0]
            self.cache.values[i][row, :, :n] = v[0]
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

    def _forward(self, x, positions, attention):
        """x (batch, seq) ids -> (batch, vocab) logits of the last position; attention(i, k, v) -> attend(q)."""
        b, s = x.shape
        h = F.embedding(x, self.embed)
        cos, sin = (t[:, None] for t in self.rotary(h, positions))  # (batch, 1, seq, dim)
        for i, (ln1, wqkv, wo, ln2, wgu, wd) in enumerate(self.layers):
            qkv = wqkv(self._norm(h, ln1)).view(b, s, -1, self.head_dim).transpose(1, 2)
            # queries and keys rotate together: one rotary embedding, not two (the same arithmetic per head)
            qk, v = qkv[:, : self.qk], qkv[:, self.qk :]
            qk = qk * cos + rotate_half(qk) * sin
            o = attention(i, qk[:, self.heads :], v)(qk[:, : self.heads])  # (batch, heads, seq, dim)
            h = h + wo(o.transpose(1, 2).reshape(b, s, -1))
            gate, up = wgu(self._norm(h, ln2)).chunk(2, -1)
            h = h + wd(F.silu(gate) * up)
        return self.lm_head(self._norm(h[:, -1], self.norm))

    def _norm(self, h, weight):
        """transformers' LlamaRMSNorm in 2 operations instead of 7 (fp32 math, then the weight in the model's dtype);
        the same numbers, bit for bit (tests/test_llama_step.py)."""
        if h.dtype == torch.float32:
            return F.rms_norm(h, (h.shape[-1],), None, self.eps) * weight
        return F.rms_norm(h.float(), (h.shape[-1],), None, self.eps).to(h.dtype) * weight
