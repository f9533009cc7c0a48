"""Weight diffs, tensor by tensor: make_diff publishes a fine-tune as tuned - raw, recover writes raw + diff, and
merge_lora folds a LoRA adapter into its base; weight_diff.py is their command line.

The diff is tuned - raw in fp32 and recover writes raw + diff. If the raw tokenizer lacks the special
tokens train.py adds ([PAD] for LLaMA), the raw embeddings first get the same mean-initialised rows.
Neither side ever holds a whole model: tensors are read in row chunks of about --chunk_mb MiB and
written as sharded safetensors with an index. make_diff stores one sha256 per tensor of what recover
will produce (raw + diff in fp32) and recover checks them. Outputs are built in a temp folder next to
the destination and renamed into place only after every check has passed.
"""

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from alpaca_trainml import jsonio, models
from alpaca_trainml.checkpoints import lora_merge
from alpaca_trainml.checkpoints.checkpoint_io import (
    Checkpoint,
    as_bytes,
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
MANIFEST = "weight_diff_manifest.json"
MANIFEST_FORMAT = "alpaca-weight-diff/1"
# The original's only integrity check: the fp32 sum of every weight of the recovered Alpaca-7B.
ALPACA_7B_SUM, ALPACA_7B_ATOL = 50637.1836, 1e-2
# How we recognise the Alpaca-7B diff: LLaMA-7B's config with the [PAD] row added (32000 + 1).
ALPACA_7B_CONFIG = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    vocab_size=32001,
)


def pair_up(raw_shapes, other_shapes, resize, known, other_name):
    """Shapes of the output: raw keys must equal the other side's, with equal shapes after the resize.

    A key outside `known` (the architecture's state dict, e.g. an old rotary inv_freq buffer) that only
    one side has is dropped with a warning, as from_pretrained drops it. Other problems are collected
    into one UsageError naming every key."""
    problems, shapes = [], {}
    for key in sorted(raw_shapes.keys() ^ other_shapes.keys()):
        where = "the raw model" if key in raw_shapes else other_name
        if key not in known:
            logger.warning("%s: only in %s and not a weight of this architecture; skipped", key, where)
        else:
            problems.append(f"{key}: only in {where}; both must hold the same tensors")
    for key in sorted(raw_shapes.keys() & other_shapes.keys()):
        spec = resize.get(key)
        if spec and spec[0] > raw_shapes[key][0]:
            problems.append(
                f"{key}: the raw tokenizer has {spec[0]} tokens but the table only {raw_shapes[key][0]} rows"
            )
            continue
        want = (spec[0] + spec[1], *raw_shapes[key][1:]) if spec else tuple(raw_shapes[key])
        if want != tuple(other_shapes[key]):
            note = f" after adding {spec[1]} token rows" if spec and spec[1] else ""
            problems.append(
                f"{key}: shape {list(other_shapes[key])} in {other_name}, the raw model gives {list(want)}{note}"
            )
        shapes[key] = want
    if problems:
        raise UsageError(f"the raw model and {other_name} do not pair up:\n  " + "\n  ".join(problems))
    return shapes


def _prepare(path_raw, path_other, other_name):
    """Open both checkpoints and check they pair up: (raw, other, resize, means, shapes, state_dict order)."""
    raw, other = Checkpoint(path_raw), Checkpoint(path_other)
    model = meta_model(path_raw)
    order = list(model.state_dict().keys())
    resize = embedding_resize(path_raw, model, raw.shapes)
    shapes = pair_up(raw.shapes, other.shapes, resize, set(order), other_name)
    resize = {k: r for k, r in resize.items() if k in shapes and shapes[k] != raw.shapes[k]}  # drop no-ops
    means = {k: mean_row(raw, k, keep) for k, (keep, _) in resize.items()}
    return raw, other, resize, means, shapes, order


def make_diff(path_raw, path_tuned, path_diff, device="cpu", chunk_mb=16, max_shard_mb=2048):
    """Write tuned - raw (fp32) to path_diff with the tuned config and tokenizer and a sha256 manifest."""
    path_raw = models.resolve_model_path(path_raw)  # embedded:smollm2-135m, train.py's default base
    if (Path(path_tuned) / "adapter_config.json").is_file():
        raise UsageError(
            f"{path_tuned}: a LoRA adapter, not a whole model; merge it into its base first, then diff the merged "
            f"folder: python weight_diff.py merge_lora --path_raw {path_raw} --path_adapter {path_tuned} "
            "--path_tuned <merged folder>"
        )
    raw, tuned, resize, means, shapes, _ = _prepare(path_raw, path_tuned, f"the tuned model {path_tuned}")
    hashes = {}

    def produce(key):
        sha = hashlib.sha256()
        for start, stop in row_chunks(shapes[key], int(chunk_mb * MiB)):
            # in place, so two chunks are alive at a time, not four (rows() and raw_rows() return new tensors)
            r = raw_rows(raw, key, start, stop, resize, means).to(device)
            diff = tuned.rows(key, start, stop).to(device).sub_(r)
            sha.update(as_bytes(r.add_(diff).cpu()))  # what recover will write: raw + diff, not tuned
            yield diff.cpu()
        hashes[key] = sha.hexdigest()

    with staging(path_diff, (path_raw, path_tuned)) as tmp:
        write_model(tmp, shapes, produce, int(max_shard_mb * MiB), "make_diff")
        copy_side_files(path_tuned, tmp)
        tensors = {k: {"shape": list(shapes[k]), "sha256": hashes[k]} for k in sorted(shapes)}
        jsonio.jdump(
            {
                "format": MANIFEST_FORMAT,
                "hash": "sha256 of raw + diff in float32, row-major little-endian bytes",
                "tensors": tensors,
            },
            tmp / MANIFEST,
        )
    logger.info("wrote the diff of %d tensors to %s", len(shapes), path_diff)
    return str(path_diff)


def load_manifest(path_diff, shapes):
    """{tensor name: sha256} from the diff's manifest, or None (with a warning) for a diff without one."""
    path = Path(path_diff) / MANIFEST
    if not path.is_file():
        logger.warning(
            "%s has no %s (e.g. the original Alpaca diff): the recovered tensors are not hash-checked",
            path_diff,
            MANIFEST,
        )
        return None
    tensors = jsonio.jload(path)["tensors"]
    problems = [f"{k}: in the weights but not in the manifest" for k in sorted(shapes.keys() - tensors.keys())]
    problems += [f"{k}: in the manifest but not in the weights" for k in sorted(tensors.keys() - shapes.keys())]
    problems += [
        f"{k}: shape {list(shapes[k])}, the manifest says {tensors[k]['shape']}"
        for k in sorted(shapes.keys() & tensors.keys())
        if list(shapes[k]) != tensors[k]["shape"]
    ]
    if problems:
        raise UsageError(f"{path} does not match the diff's weights:\n  " + "\n  ".join(problems))
    return {k: v["sha256"] for k, v in tensors.items()}


def naive_check_applies(path_diff):
    """True for the Alpaca-7B diff, recognised from its config.json; else log why the check is skipped."""
    config = json.loads((Path(path_diff) / "config.json").read_text())
    if all(config.get(k) == v for k, v in ALPACA_7B_CONFIG.items()):
        return True
    logger.info(
        "check_integrity_naively: skipped, %s is not the Alpaca-7B diff and %.4f is the sum of "
        "Alpaca-7B's weights only (the manifest's sha256 check, if any, still applies)",
        path_diff,
        ALPACA_7B_SUM,
    )
    return False


def naive_sum(sums, order):
    """fp32 sum of the per-tensor sums, in state_dict order as the original added them."""
    total = torch.zeros((), dtype=torch.float32)
    for key in [k for k in order if k in sums] + sorted(sums.keys() - set(order)):
        total = total + sums[key]
    return total


def check_naive_sum(total, path_raw):
    if not torch.allclose(total, torch.tensor(ALPACA_7B_SUM), atol=ALPACA_7B_ATOL, rtol=0):
        raise UsageError(
            f"the recovered weights sum to {total.item():.4f}, Alpaca-7B's to {ALPACA_7B_SUM}: "
            f"{path_raw} is not the LLaMA-7B the diff was made from, or a file is corrupt"
        )


def recover(
    path_raw,
    path_diff,
    path_tuned=None,
    device="cpu",
    test_inference=True,
    check_integrity_naively=True,
    chunk_mb=16,
    max_shard_mb=2048,
    inference_max_length=256,
    sample=None,
):
    """Write raw + diff (fp32) to path_tuned, checking each tensor against the diff's manifest.

    Returns the folder; the original returned the model, which we never hold. Without path_tuned the
    result goes to a temp folder for the checks and the test generation, then is deleted. sample(path, device,
    max_length): the test generation that test_inference runs on the result (the script passes
    generation.model.sample_completion; this package sits below generation/)."""
    path_raw = models.resolve_model_path(path_raw)
    raw, diff, resize, means, shapes, order = _prepare(path_raw, path_diff, f"the diff {path_diff}")
    expected = load_manifest(path_diff, shapes)
    naive = check_integrity_naively and naive_check_applies(path_diff)
    chunk_bytes = (
        None if naive else int(chunk_mb * MiB)
    )  # whole tensors: per-tensor fp32 sums as the original took them
    sums = {}

    def produce(key):
        sha, total = hashlib.sha256(), torch.zeros((), dtype=torch.float32)
        for start, stop in row_chunks(shapes[key], chunk_bytes):
            rec = (
                raw_rows(raw, key, start, stop, resize, means)
                .to(device)
                .add_(diff.rows(key, start, stop).to(device))
                .cpu()
            )
            sha.update(as_bytes(rec))
            total = total + rec.sum()
            yield rec
        sums[key] = total
        if expected is not None and sha.hexdigest() != expected[key]:
            raise UsageError(
                f"{key}: sha256 of the recovered tensor is {sha.hexdigest()}, the manifest of {path_diff} "
                f"promises {expected[key]}; {diff.files[key]} or {raw.files[key]} is corrupt or not the "
                "raw model the diff was made from"
            )

    dest = path_tuned or tempfile.mkdtemp(prefix="recovered.")
    try:
        with staging(dest, (path_raw, path_diff)) as tmp:
            write_model(tmp, shapes, produce, int(max_shard_mb * MiB), "recover")
            if naive:
                check_naive_sum(naive_sum(sums, order), path_raw)
            copy_side_files(path_diff, tmp)
        logger.info(
            "recovered %d tensors into %s%s", len(shapes), dest, "" if expected is None else ", all match the manifest"
        )
        if test_inference and sample is not None:
            sample(dest, device, max_length=inference_max_length)
    finally:
        if path_tuned is None:
            shutil.rmtree(dest, ignore_errors=True)
    return None if path_tuned is None else str(path_tuned)


def merge_lora(path_raw, path_adapter, path_tuned, chunk_mb=16, max_shard_mb=2048):
    """Write the base with a train.py --use_peft adapter merged in, a plain fp32 model; see lora_merge."""
    return lora_merge.merge(path_raw, path_adapter, path_tuned, chunk_mb, max_shard_mb)
