"""Our Llama step (llama_step.LlamaStep) with a LoRA adapter per row: each row of the batch may use another adapter
of the server's (lora_adapters.py), or none, in the same forward.

Each projection of a layer (fused q/k/v, o, fused gate/up, down) computes the base's output for every row as before,
then adds each row's adapter delta, x @ A^T @ B^T (the scaling is in B): one pair of small matmuls per projection
over the step's adapters stacked, with a 0/1 mask that keeps each row's own adapter (LoraStep). The whole-step
kernel (csrc/decode.cpp) has no LoRA hook: a decode step with any adapter row takes the step's Python forward, over
the same kernel matmuls; a step of base rows only still takes the kernel.

Why not peft's mixed batch (`adapter_names=` in a PeftModel's forward): it runs transformers' forward (hf_step.py).
One decode step of 8 rows over 4 adapters of rank 16 on SmolLM2-135M took 1.4 to 1.7 times our step's time there
(the fastest of 10 steps, two runs on a shared 2-core CPU, benchmarks/lora_serving.py, in benchmarks/RESULTS.md), and
it would take the base's rows off our kernel too.
"""

import torch

from alpaca_trainml.generation.llama_step import LlamaStep
from alpaca_trainml.generation.lora_adapters import SLOTS


class LoraWeight:
    """A projection (llama_step.Weight) plus the adapters' delta on their rows, as the step's `plan` gives it for this
    projection: (A (R, in), B (out, R), mask (rows, R) or None), set before each forward."""

    __slots__ = ("base", "key", "step")

    def __init__(self, base, key, step):
        self.base, self.key, self.step = base, key, step  # key: (layer index, slot) in LoraAdapter.pairs

    def __getattr__(self, name):  # full, bias, kernel...: the base weight's
        return getattr(self.base, name)

    def __call__(self, x):
        y = self.base(x)
        plan = self.step.plan.get(self.key)
        if plan is not None:
            a, b, mask = plan
            h = x @ a.T  # (rows, ..., R)
            if mask is not None:  # each row keeps its own adapter's columns
                h = h * mask.view(mask.shape[0], *[1] * (x.dim() - 2), -1)
            y += h @ b.T
        return y


def stacked(adapters, key):
    """(A, B, ranks) of several adapters on one projection: their A stacked (sum of ranks, in), their B side by side
    (out, sum of ranks), and each one's rank there (0 for an adapter that leaves the projection alone); None when
    none changes it."""
    pairs = [adapter.pairs.get(key) for adapter in adapters]
    if all(p is None for p in pairs):
        return None
    a = torch.cat([p[0] for p in pairs if p is not None])
    b = torch.cat([p[1] for p in pairs if p is not None], dim=1)
    return a, b, torch.tensor([0 if p is None else p[0].shape[0] for p in pairs], device=a.device)


class LoraStep(LlamaStep):
    """LlamaStep whose rows each carry an adapter (None: the base). prefill(prompts, adapters) takes one per prompt.

    Several adapters in a step: every projection runs one pair of matmuls over all their pairs stacked (made when a
    step brings an adapter the stacks lack, kept while the rows' adapters are among them), and a 0/1 mask keeps each
    row's own adapter's columns. The extra arithmetic is small (the stacked ranks, 64 for 4 adapters of rank 16,
    against the layer's width), and the number of operations no longer grows with the number of adapters."""

    def __init__(self, model):
        super().__init__(model)  # the kernel's decoder is built over the base weights first
        self.kernel_decoder = self.decoder
        self.fuses = False  # fused.py's pass has no adapters: prompts are prefilled apart, each with its own
        # a step with adapter rows runs torch's operations, whose verify matches decode in fp32 only (llama_step.py)
        self.verifies = self.embed.dtype == torch.float32
        self.row_adapters, self.plan, self.routed = [], {}, None
        self.stacks, self.stacked = {}, []  # the adapters are held, so that no other object takes their id()
        self.layers = [
            layer._replace(**{slot: LoraWeight(getattr(layer, slot), (i, slot), self) for slot in SLOTS})
            for i, layer in enumerate(self.layers)
        ]

    def _route(self, adapters):
        """Set the plan for a forward of rows on `adapters`; the kernel runs only a step without any adapter row."""
        if self.routed is not None and len(adapters) == len(self.routed):
            if all(a is b for a, b in zip(adapters, self.routed)):
                return  # the same rows as the last forward: the same plan
        distinct = list({id(a): a for a in adapters if a is not None}.values())
        self.decoder = None if distinct else self.kernel_decoder
        keys = [(i, slot) for i in range(len(self.layers)) for slot in SLOTS]
        if len(distinct) == 1:  # its own pairs, and a mask only where base rows share the step
            adapter = distinct[0]
            rows = torch.tensor([[float(a is adapter)] for a in adapters], device=self.embed.device)
            mask = None if all(a is adapter for a in adapters) else rows.to(self.embed.dtype)
            self.plan = {
                k: (a, b, None if mask is None else mask.expand(-1, a.shape[0])) for k, (a, b) in adapter.pairs.items()
            }
        elif distinct:
            # a set the stacks do not hold: stack it. One they hold (some adapters' rows have left for now): keep
            # them, the mask zeroes the others' columns, and the copy is not made again when those rows come back
            if not {id(a) for a in distinct} <= {id(a) for a in self.stacked}:
                self.stacks, self.stacked = {k: stacked(distinct, k) for k in keys}, distinct
            rows = [[float(a is d) for d in self.stacked] for a in adapters]
            onehot = torch.tensor(rows, device=self.embed.device, dtype=self.embed.dtype)  # (rows, adapters)
            self.plan = {
                k: (a, b, onehot.repeat_interleave(ranks, dim=1))
                for k, stack in self.stacks.items()
                if stack is not None
                for a, b, ranks in [stack]
            }
        else:
            self.plan = {}
        self.routed = list(adapters)

    @torch.inference_mode()
    def keep(self, rows):
        super().keep(rows)
        self.row_adapters = [self.row_adapters[i] for i in rows]

    @torch.inference_mode()
    def prefill(self, prompts, adapters=None):
        adapters = list(adapters or [None] * len(prompts))
        logits = []
        for ids, adapter in zip(prompts, adapters):  # LlamaStep prefills each prompt alone
            self._route([adapter])
            logits.append(super().prefill([ids]))
            self.row_adapters.append(adapter)
        return torch.cat(logits)

    @torch.inference_mode()
    def decode(self, ids):
        self._route(self.row_adapters)
        return super().decode(ids)

    @torch.inference_mode()
    def verify(self, tokens, counts=None):
        self._route(self.row_adapters)
        return super().verify(tokens, counts)
