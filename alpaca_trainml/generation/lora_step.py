"""Our Llama step (llama_step.LlamaStep) with a LoRA adapter per row: each row of the batch may use another adapter
of the server's (lora_adapters.py), or none, in the same forward.

Each projection of a layer (fused q/k/v, o, fused gate/up, down) computes the base's output for every row as before,
then adds each adapter's delta to its own rows: (x[rows] @ A^T) @ B^T, rows grouped by adapter, so that 8 rows over 4
adapters are 4 pairs of small matmuls per projection. The whole-step kernel (csrc/decode.cpp) has no LoRA hook: a
decode step with any adapter row takes the step's Python forward, over the same kernel matmuls; a step of base rows
only still takes the kernel.

Why not peft's mixed batch (`adapter_names=` in a PeftModel's forward): it runs transformers' forward (hf_step.py),
which on a CPU costs about twice our Python step at 135M parameters, for every row, base rows included
(benchmarks/lora_serving.py measures both).
"""

import torch

from alpaca_trainml.generation.llama_step import LlamaStep
from alpaca_trainml.generation.lora_adapters import SLOTS


class LoraWeight:
    """A projection (llama_step.Weight) plus the delta of each adapter on its rows; `routing` is the step's list of
    (adapter, row indices or None for every row), set before each forward."""

    __slots__ = ("base", "key", "step")

    def __init__(self, base, key, step):
        self.base, self.key, self.step = base, key, step  # key: (layer index, slot) in LoraAdapter.pairs

    def __getattr__(self, name):  # full, bias, kernel...: the base weight's
        return getattr(self.base, name)

    def __call__(self, x):
        y = self.base(x)
        for adapter, rows in self.step.routing:
            pair = adapter.pairs.get(self.key)
            if pair is None:
                continue
            a, b = pair
            if rows is None:  # every row: one adapter for the whole batch
                y += (x @ a.T) @ b.T
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
        return y


class LoraStep(LlamaStep):
    """LlamaStep whose rows each carry an adapter (None: the base). prefill(prompts, adapters) takes one per prompt."""

    def __init__(self, model):
        super().__init__(model)  # the kernel's decoder is built over the base weights first
        self.kernel_decoder = self.decoder
        self.row_adapters, self.routing = [], []
        self.layers = [
            layer._replace(**{slot: LoraWeight(getattr(layer, slot), (i, slot), self) for slot in SLOTS})
            for i, layer in enumerate(self.layers)
        ]

    def _route(self, adapters):
        """Group the rows by adapter; the kernel runs only a step without any adapter row."""
        groups = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                groups.setdefault(id(adapter), (adapter, []))[1].append(i)
        device = self.embed.device
        self.routing = [
            (adapter, None if len(rows) == len(adapters) else torch.tensor(rows, device=device))
            for adapter, rows in groups.values()
        ]
        self.decoder = None if self.routing else self.kernel_decoder

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
    def verify(self, tokens):
        self._route(self.row_adapters)
        return super().verify(tokens)
