"""Merge a LoRA adapter into its full-precision base, tensor by tensor: a plain HF model that from_pretrained loads.

    python weight_diff.py merge_lora --path_raw BASE --path_adapter out/lora --path_tuned out/merged

Each adapted linear layer becomes W + (B @ A) * alpha / r (alpha / sqrt(r) with rslora), in fp32, a block of rows at
a time, as weight_diff's recover streams. The embedding rows train.py added start as special_tokens' mean row and take
the trained values the adapter holds. An adapter trained on a 4-bit base merges the same way, into the fp32 base.
"""

import json
import logging
import math
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from alpaca_trainml import jsonio, models
from alpaca_trainml.checkpoints import adapters
from alpaca_trainml.checkpoints.checkpoint_io import (
    Checkpoint,
    copy_side_files,
    meta_model,
    row_chunks,
    staging,
    write_model,
)
from alpaca_trainml.cli import UsageError
from alpaca_trainml.data.special_tokens import embedding_resize, mean_row, raw_rows

logger = logging.getLogger(__name__)

MiB = 2**20
PREFIX = "base_model.model."  # peft's prefix on every saved tensor name
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")


class Adapter:
    """A saved LoRA adapter, keyed by the base tensor each part changes: lora {key: (A, B)}, tokens {key: (ids,
    rows)} (trainable token rows), full {key: tensor} (whole tables peft saved for a resized vocabulary)."""

    def __init__(self, path):
        self.path = Path(path)
        config = adapters.adapter_config(path)
        used = [k for k in UNSUPPORTED if config.get(k)]
        if used:
            raise UsageError(f"{self.path / adapters.ADAPTER_CONFIG}: merge_lora does not handle {', '.join(used)}")
        self.scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            raise UsageError(f"{self.path}: no adapter_model.safetensors; give the folder train.py --use_peft wrote")
        ids = config.get("trainable_token_indices") or {}
        ids = ids if isinstance(ids, dict) else {"embed_tokens": ids}  # a plain list means the input embeddings
        self.lora, self.tokens, self.full, problems = {}, {}, {}, []
        for name, tensor in load_file(weights).items():
            if not name.startswith(PREFIX):
                problems.append(f"{name}: not a peft tensor name")
                continue
            module, _, part = name[len(PREFIX) :].partition(".lora_")
            if part in ("A.weight", "B.weight"):
                a_b = self.lora.setdefault(f"{module}.weight", [None, None])
                a_b[part[0] == "B"] = tensor.float()
            elif name.endswith(".token_adapter.trainable_tokens_delta"):
                module = name[len(PREFIX) : -len(".token_adapter.trainable_tokens_delta")]
                rows = [v for k, v in ids.items() if module == k or module.endswith(f".{k}")]
                if len(rows) != 1:
                    problems.append(f"{name}: adapter_config.json gives no trainable_token_indices for {module}")
                    continue
                self.tokens[f"{module}.weight"] = (torch.tensor(rows[0]), tensor.float())
            elif not part:
                self.full[name[len(PREFIX) :]] = tensor.float()
            else:
                problems.append(f"{name}: lora_{part} is not a LoRA linear layer, which is all merge_lora handles")
        if problems:
            raise UsageError(f"{weights}:\n  " + "\n  ".join(problems))

    def keys(self):
        return self.lora.keys() | self.tokens.keys() | self.full.keys()


def check_pairs(adapter, shapes, path_raw):
    """Every tensor the adapter changes is in the base with a shape it fits; one ValueError naming every problem."""
    problems = [f"{k}: changed by the adapter, not in {path_raw}" for k in sorted(adapter.keys() - shapes.keys())]
    for key, (a, b) in sorted(adapter.lora.items()):
        if key in shapes and (a is None or b is None or (b.shape[0], a.shape[1]) != tuple(shapes[key])):
            got = "lora_A or lora_B missing" if a is None or b is None else f"B @ A is {[b.shape[0], a.shape[1]]}"
            problems.append(f"{key}: {got}, the base tensor is {list(shapes[key])}")
    for key, (ids, rows) in sorted(adapter.tokens.items()):
        if key in shapes and (int(ids.max()) >= shapes[key][0] or rows.shape[1:] != tuple(shapes[key][1:])):
            problems.append(f"{key}: token rows {ids.tolist()} of width {rows.shape[1]} do not fit {list(shapes[key])}")
    for key, tensor in sorted(adapter.full.items()):
        if key in shapes and tuple(tensor.shape) != tuple(shapes[key]):
            problems.append(f"{key}: {list(tensor.shape)} in the adapter, {list(shapes[key])} after the resize")
    if problems:
        raise UsageError(f"the adapter does not fit the base {path_raw} (another base?):\n  " + "\n  ".join(problems))


def merged_rows(adapter, key, start, stop, base_rows):
    """Rows start:stop of the merged tensor `key`, given the same rows of the (resized) base in fp32."""
    rows = adapter.full[key][start:stop].clone() if key in adapter.full else base_rows
    if key in adapter.lora:
        a, b = adapter.lora[key]
        rows += (b[start:stop] @ a) * adapter.scaling  # peft's order: (B @ A) * scaling
    if key in adapter.tokens:
        ids, values = adapter.tokens[key]
        first = 0 if start is None else start
        hit = (ids >= first) & (ids < first + rows.shape[0])
        rows[ids[hit] - first] = values[hit]
    return rows


def tied_token_rows(adapter, path_raw, shapes):
    """With tied embeddings peft trains the rows once, on the input table: a base that still stores lm_head gets them
    too, so both copies agree as from_pretrained would tie them."""
    model = meta_model(path_raw)
    if not model.config.get_text_config().tie_word_embeddings:
        return
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    embed = names.get(id(model.get_input_embeddings().weight))
    out = model.get_output_embeddings()
    for name, p in model.named_parameters(remove_duplicate=False):
        if out is not None and p is out.weight and name != embed and name in shapes and embed in adapter.tokens:
            adapter.tokens.setdefault(name, adapter.tokens[embed])


def merge(path_raw, path_adapter, path_tuned, chunk_mb=16, max_shard_mb=2048):
    """Write base + adapter (fp32 safetensors, config, the adapter's tokenizer) to path_tuned; return the folder.
    path_raw None: the base adapter_config.json names."""
    path_raw = models.resolve_model_path(adapters.base_of(path_adapter, path_raw))
    adapter = Adapter(path_adapter)
    raw = Checkpoint(path_raw)
    resize = {k: r for k, r in embedding_resize(path_raw, meta_model(path_raw), raw.shapes).items() if r[1]}
    means = {k: mean_row(raw, k, keep) for k, (keep, _) in resize.items()}
    shapes = {k: (sum(resize[k]), *s[1:]) if k in resize else tuple(s) for k, s in raw.shapes.items()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path_adapter)
    for key in resize:
        adapters.check_vocab(path_adapter, len(tokenizer), path_raw, shapes[key][0])
    check_pairs(adapter, shapes, path_raw)
    tied_token_rows(adapter, path_raw, shapes)

    def produce(key):
        for start, stop in row_chunks(shapes[key], int(chunk_mb * MiB)):
            yield merged_rows(adapter, key, start, stop, raw_rows(raw, key, start, stop, resize, means))

    with staging(path_tuned, (path_raw, path_adapter)) as tmp:
        write_model(tmp, shapes, produce, int(max_shard_mb * MiB), "merge_lora")
        copy_side_files(path_raw, tmp)
        config = json.loads((tmp / "config.json").read_text())
        if resize:
            config["vocab_size"] = len(tokenizer)  # what resize_token_embeddings writes into the config
        jsonio.jdump(config, tmp / "config.json")
        tokenizer.save_pretrained(tmp)  # the adapter's: the base's plus the special tokens train.py added
    logger.info("merged %s (%d adapted tensors) into %s: %s", path_adapter, len(adapter.keys()), path_raw, path_tuned)
    return str(path_tuned)
