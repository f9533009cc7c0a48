"""Several LoRA adapters on one served base (serve.py --lora_modules, as vLLM's flag): reading each adapter folder,
checking it fits the base, and holding its low-rank pairs by the projection of our Llama step they change
(lora_step.py adds them per row). The base's weights are never changed: any mix of adapters runs in one batch.

An adapter's delta on a linear layer is x @ A^T @ B^T * scaling (peft's arithmetic, unmerged). Our step fuses q/k/v
and gate/up into one weight each (llama_step._fused): their adapters' pairs are fused the same way, A stacked and B
block-diagonal, so that each fused projection costs one pair of small matmuls per adapter.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from alpaca_trainml.checkpoints import adapters
from alpaca_trainml.checkpoints.lora_merge import Adapter, check_pairs
from alpaca_trainml.cli import UsageError
from alpaca_trainml.generation.llama_step import FAST_ENV, _projections, supports

SLOTS = ("qkv", "o", "gate_up", "down")  # the projections of llama_step.Layer an adapter may change


def parse_module(spec):
    """One --lora_modules item: `name=path`, or vLLM's JSON form {"name", "path", "base_model_name"}; a dict of
    name, path and base_model_name (None when not given)."""
    if spec.lstrip().startswith("{"):
        try:
            item = json.loads(spec)
        except json.JSONDecodeError as e:
            raise UsageError(f"--lora_modules {spec!r}: not valid JSON ({e})") from e
        extra = sorted(set(item) - {"name", "path", "base_model_name"}) if isinstance(item, dict) else []
        if not isinstance(item, dict) or extra or not item.get("name") or not item.get("path"):
            hint = f"unknown keys {extra}; " if extra else ""
            raise UsageError(f"--lora_modules {spec!r}: {hint}give a JSON object with name, path (and base_model_name)")
        return dict(name=str(item["name"]), path=str(item["path"]), base_model_name=item.get("base_model_name"))
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise UsageError(f"--lora_modules {spec!r}: give NAME=PATH (or vLLM's JSON form with name and path)")
    return dict(name=name.strip(), path=path.strip(), base_model_name=None)


def _fused_pair(adapter, members, dtype, device):
    """(A, B) for one fused projection: A (sum of ranks, in), B (sum of outs, sum of ranks) with the scaling folded
    in; members not adapted add zero rows to B. None when the adapter changes none of them."""
    pairs = [adapter.lora.get(f"{name}.weight") for name, _ in members]
    if all(p is None for p in pairs):
        return None
    a = torch.cat([p[0] for p in pairs if p is not None])
    b = a.new_zeros(sum(out for _, out in members), a.shape[0])
    row = col = 0
    for p, (_, out) in zip(pairs, members):
        if p is not None:
            r = p[0].shape[0]
            b[row : row + out, col : col + r] = p[1] * adapter.scaling
            col += r
        row += out
    return a.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous()


class LoraAdapter:
    """One adapter folder, checked against the base: `pairs` {(layer index, slot): (A, B)} for lora_step.LoraWeight,
    `hooks` {module name: (A, B, scaling)} for a beam search through transformers (applied())."""

    def __init__(self, name, path, parent, model, module_names):
        self.name, self.path, self.parent = name, str(path), parent
        if not adapters.is_adapter(path):
            raise UsageError(f"LoRA adapter {name!r}: {path} is not an adapter folder (no {adapters.ADAPTER_CONFIG})")
        adapter = Adapter(path)  # a UsageError names a part it cannot read (DoRA, modules_to_save...)
        self.check(adapter, model, module_names)
        param = next(model.parameters())
        self.pairs = {}
        for i, layer in enumerate(model.model.layers):
            qkv, o, gate_up, down = _projections(layer)
            for slot, group in zip(SLOTS, (qkv, [o], gate_up, [down])):
                members = [(module_names[id(m)], m.out_features) for m in group]
                pair = _fused_pair(adapter, members, param.dtype, param.device)
                if pair is not None:
                    self.pairs[i, slot] = pair
        self.hooks = {
            key[: -len(".weight")]: (a.to(param.dtype), b.to(param.dtype), adapter.scaling)
            for key, (a, b) in adapter.lora.items()
        }

    def check(self, adapter, model, module_names):
        """The adapter fits the base: the same architecture and shapes, LoRA pairs on the step's projections only,
        and no token rows of its own (a vocabulary train.py grew must be served alone, merged). One UsageError."""
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        try:
            check_pairs(adapter, shapes, f"{model.name_or_path} (the served base)")
        except UsageError as e:
            raise UsageError(f"LoRA adapter {self.name!r} ({self.path}): {e}") from e
        linear = {module_names[id(m)] + ".weight" for layer in model.model.layers for m in _all(layer)}
        other = sorted(adapter.lora.keys() - linear)
        problems = [f"{k}: a LoRA pair on a layer our step does not adapt" for k in other]
        problems += [f"{k}: trained token rows (a grown vocabulary)" for k in sorted(adapter.tokens)]
        problems += [f"{k}: a whole table of its own" for k in sorted(adapter.full)]
        if problems:
            raise UsageError(
                f"LoRA adapter {self.name!r} ({self.path}) cannot share the base; serve it alone with "
                "--model_name_or_path:\n  " + "\n  ".join(problems)
            )


def _all(layer):
    qkv, o, gate_up, down = _projections(layer)
    return [*qkv, o, *gate_up, down]


class AdapterSet:
    """The adapters a server serves by name beside its base (`base_name`); add() and remove() are safe while the
    engine runs: a running request keeps the adapter object it started with."""

    def __init__(self, model, base_name):
        if not supports(model):
            raise UsageError(
                f"LoRA adapters per request need a Llama-family model on our decode step ({type(model).__name__} is "
                f"not one, or {FAST_ENV}=0 is set); merge the adapter instead: weight_diff.py merge_lora"
            )
        self.model, self.base_name, self.by_name = model, base_name, {}
        self.module_names = {id(m): n for n, m in model.named_modules()}  # model.layers.0.self_attn.q_proj...

    def add(self, name, path, base_model_name=None):
        if name == self.base_name or name in self.by_name:
            raise UsageError(f"LoRA adapter name {name!r} is taken already (by the base or another adapter)")
        parent = base_model_name or self.base_name
        self.by_name[name] = LoraAdapter(name, Path(path).expanduser(), parent, self.model, self.module_names)
        return self.by_name[name]

    def remove(self, name):
        return self.by_name.pop(name, None)

    def get(self, name):
        return self.by_name.get(name)

    def names(self):
        return list(self.by_name)


@contextmanager
def applied(model, adapter):
    """The adapter added to the transformers model's forward (forward hooks on its linear layers) for the block:
    a beam search, which runs alone, through model.generate(). No-op for None."""
    if adapter is None:
        yield
        return
    modules = dict(model.named_modules())
    handles = []
    for name, (a, b, scaling) in adapter.hooks.items():

        def hook(module, inputs, out, a=a, b=b, scaling=scaling):
            return out + (inputs[0] @ a.T @ b.T) * scaling

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
