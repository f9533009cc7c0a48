"""Publish a fine-tune as a weight diff against its base model, and recover it, tensor by tensor.

    python weight_diff.py make_diff --path_raw llama-7b --path_tuned out --path_diff out-diff
    python weight_diff.py recover --path_raw llama-7b --path_diff alpaca-7b-wdiff --path_tuned alpaca-7b
    python weight_diff.py recover --path_raw R --path_diff D --path_tuned T --test_inference False

The diff is tuned - raw in fp32 and recover writes raw + diff. If the raw tokenizer lacks the special
tokens train.py adds ([PAD] for LLaMA), the raw embeddings first get the same mean-initialised rows.
Neither side ever holds a whole model: tensors are read in row chunks of about --chunk_mb MiB and
written as sharded safetensors with an index. make_diff stores one sha256 per tensor of what recover
will produce (raw + diff in fp32) and recover checks them. Outputs are built in a temp folder next to
the destination and renamed into place only after every check has passed.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from math import prod
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from tqdm import tqdm

import utils
from train import missing_special_tokens

logger = logging.getLogger(__name__)

MiB = 2**20
MANIFEST = "weight_diff_manifest.json"
MANIFEST_FORMAT = "alpaca-weight-diff/1"
MEAN_BLOCK_ROWS = 1024  # fixed, so make_diff and recover sum the mean row in the same order
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
TEST_INSTRUCTION = "List three technologies that make life easier."


class Checkpoint:
    """Tensor names, shapes and row slices of an HF folder: safetensors or .bin, one file or sharded."""

    LAYOUTS = (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    )

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files = {}  # tensor name -> the file holding it
        for index, single in self.LAYOUTS:
            if (self.folder / index).is_file():
                weight_map = json.loads((self.folder / index).read_text())["weight_map"]
                self.files = {k: self.folder / name for k, name in weight_map.items()}
                break
            if (self.folder / single).is_file():
                self.files = {k: self.folder / single for k in self._scan(self.folder / single)}
                break
        if not self.files:
            raise ValueError(
                f"{self.folder}: found neither model.safetensors(.index.json) nor "
                "pytorch_model.bin(.index.json); give the folder save_pretrained wrote"
            )
        self.shapes = {}
        for path in sorted(set(self.files.values())):
            if not path.is_file():
                raise ValueError(f"{path}: listed in the index of {self.folder} but missing")
            self.shapes.update({k: s for k, s in self._scan(path).items() if self.files.get(k) == path})
        if self.files.keys() - self.shapes.keys():
            missing = sorted(self.files.keys() - self.shapes.keys())
            raise ValueError(f"{self.folder}: the index lists tensors its files lack: {missing[:5]}")

    @staticmethod
    def _scan(path):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return {
            k: tuple(t.shape) for k, t in torch.load(path, map_location="cpu", mmap=True, weights_only=True).items()
        }

    def rows(self, key, start=None, stop=None):
        """Rows start:stop of tensor `key` as a new fp32 tensor (a 0-dim tensor comes whole).
        The file is opened for each call so its mapped pages leave our RSS when we return."""
        path = self.files[key]
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                part = f.get_slice(key)[start:stop] if self.shapes[key] else f.get_tensor(key)
            return part.float()
        tensor = torch.load(path, map_location="cpu", mmap=True, weights_only=True)[key]
        return (tensor[start:stop] if tensor.dim() else tensor).to(torch.float32, copy=True)


def meta_model(path):
    """The architecture of the model in `path`, with no memory behind its weights."""
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def embedding_resize(path_raw, model, keys):
    """{embedding tensor name: (rows kept, rows added)} as train.py resizes the raw model.

    Like smart_tokenizer_and_embedding_resize: the tables become len(tokenizer) rows, the last
    `added` of them the mean of the rows before. We add what train.py adds (missing_special_tokens):
    for LLaMA that is the original's single [PAD]; for other tokenizers the shapes then match."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path_raw)
    added = tokenizer.add_special_tokens(missing_special_tokens(tokenizer))
    tables = [model.get_input_embeddings(), model.get_output_embeddings()]
    ids = {id(t.weight) for t in tables if t is not None}
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids and n in keys]
    return {n: (len(tokenizer) - added, added) for n in names}


def pair_up(raw_shapes, other_shapes, resize, known, other_name):
    """Shapes of the output: raw keys must equal the other side's, with equal shapes after the resize.

    A key outside `known` (the architecture's state dict, e.g. an old rotary inv_freq buffer) that only
    one side has is dropped with a warning, as from_pretrained drops it. Other problems are collected
    into one ValueError naming every key."""
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
        raise ValueError(f"the raw model and {other_name} do not pair up:\n  " + "\n  ".join(problems))
    return shapes


def row_chunks(shape, chunk_bytes):
    """(start, stop) row ranges of about chunk_bytes of fp32 each; chunk_bytes=None: the whole tensor."""
    if not shape:
        return [(None, None)]
    step = shape[0] if chunk_bytes is None else max(1, chunk_bytes // (4 * prod(shape[1:])))
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], max(step, 1))] or [(0, 0)]


def mean_row(raw, key, keep):
    """(1, hidden) fp32 mean of rows 0:keep, summed in fp64 over fixed blocks: the same bits every run.
    The original took torch's fp32 mean of the whole table; the two differ by float rounding only."""
    acc = torch.zeros(raw.shapes[key][1:], dtype=torch.float64)
    for i in range(0, keep, MEAN_BLOCK_ROWS):
        acc += raw.rows(key, i, min(i + MEAN_BLOCK_ROWS, keep)).sum(0, dtype=torch.float64)
    return (acc / keep).to(torch.float32).unsqueeze(0)


def raw_rows(raw, key, start, stop, resize, means):
    """Rows start:stop of the raw tensor after the resize; rows from `keep` on are the mean row."""
    if key not in resize:
        return raw.rows(key, start, stop)
    keep, start, stop = resize[key][0], start or 0, stop if stop is not None else sum(resize[key])
    parts = [raw.rows(key, start, min(stop, keep))] if start < keep else []
    if stop > keep:
        parts.append(means[key].expand(stop - max(start, keep), -1))
    return torch.cat(parts)


def as_bytes(tensor):
    """The little-endian fp32 bytes of a CPU tensor, row-major, without a copy."""
    return tensor.contiguous().numpy().reshape(-1).data.cast("B")


def plan_shards(shapes, max_shard_bytes):
    """Sorted tensor names split into shards of at most max_shard_bytes of fp32 (a bigger tensor alone)."""
    shards, size = [[]], 0
    for key in sorted(shapes):
        nbytes = 4 * prod(shapes[key])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def safetensors_header(keys, shapes):
    """The 8-byte length and JSON header of a safetensors file holding `keys` in fp32, in that order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        nbytes = 4 * prod(shapes[key])
        header[key] = {"dtype": "F32", "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to a multiple of 8 bytes
    return struct.pack("<Q", len(blob)) + blob


def write_model(out_dir, shapes, produce, max_shard_bytes, desc):
    """Write the fp32 chunks produce(key) yields, tensor by tensor, as (sharded) safetensors + index."""
    shards = plan_shards(shapes, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    with tqdm(total=len(shapes), unit="tensor", desc=desc) as bar:
        for name, keys in zip(names, shards):
            header = safetensors_header(keys, shapes)
            with open(out_dir / name, "wb") as fh:
                fh.write(header)
                for key in keys:
                    for chunk in produce(key):
                        fh.write(as_bytes(chunk))
                    bar.update(1)
                if fh.tell() != len(header) + sum(4 * prod(shapes[k]) for k in keys):
                    raise RuntimeError(f"{out_dir / name}: wrote {fh.tell()} bytes, the header promises otherwise")
                fh.flush()
                os.fsync(fh.fileno())
    if len(shards) > 1:
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        total = sum(4 * prod(s) for s in shapes.values())  # bytes of fp32 weights
        utils.jdump(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, out_dir / "model.safetensors.index.json"
        )


@contextlib.contextmanager
def staging(dest, inputs):
    """Yield a temp folder next to dest; rename it to dest only if the block finishes without error."""
    dest = Path(dest).resolve()
    if any(Path(p).resolve() == dest for p in inputs):
        raise ValueError(f"{dest} is one of the input folders; write the output to a new folder")
    # deviation: the original wrote into an existing folder; we refuse one with files in it
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} already exists and is not an empty folder; remove it or choose another path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial."))
    try:
        yield tmp
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src, dst):
    """config.json (marked fp32, as our weights are), generation_config.json, and the tokenizer."""
    config = json.loads((Path(src) / "config.json").read_text())
    config["dtype"] = "float32"
    for stale in ("torch_dtype", "quantization_config"):  # the <5 name of dtype; our weights are plain fp32
        config.pop(stale, None)
    utils.jdump(config, Path(dst) / "config.json")
    if (Path(src) / "generation_config.json").is_file():
        shutil.copyfile(Path(src) / "generation_config.json", Path(dst) / "generation_config.json")
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dst)


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
    path_raw = utils.resolve_model_path(path_raw)  # embedded:smollm2-135m, train.py's default base
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
        utils.jdump(
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
    tensors = utils.jload(path)["tensors"]
    problems = [f"{k}: in the weights but not in the manifest" for k in sorted(shapes.keys() - tensors.keys())]
    problems += [f"{k}: in the manifest but not in the weights" for k in sorted(tensors.keys() - shapes.keys())]
    problems += [
        f"{k}: shape {list(shapes[k])}, the manifest says {tensors[k]['shape']}"
        for k in sorted(shapes.keys() & tensors.keys())
        if list(shapes[k]) != tensors[k]["shape"]
    ]
    if problems:
        raise ValueError(f"{path} does not match the diff's weights:\n  " + "\n  ".join(problems))
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
        raise ValueError(
            f"the recovered weights sum to {total.item():.4f}, Alpaca-7B's to {ALPACA_7B_SUM}: "
            f"{path_raw} is not the LLaMA-7B the diff was made from, or a file is corrupt"
        )


def sample_completion(path, device="cpu", instruction=TEST_INSTRUCTION, max_length=256):
    """Generate one sampled completion from the model in `path` with the shared Alpaca template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    enc = tokenizer(utils.format_prompt(instruction), return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_len = enc["input_ids"].shape[1]
    # max_length counts the prompt, as in the original; a prompt that long still gets a few new tokens
    new_tokens = max(max_length - prompt_len, 16)
    out = model.generate(
        **enc, max_new_tokens=new_tokens, do_sample=True, top_p=0.9, num_return_sequences=1, pad_token_id=pad
    )
    completion = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    print(f"Instruction: {instruction}\nCompletion: {completion}")
    return completion


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
):
    """Write raw + diff (fp32) to path_tuned, checking each tensor against the diff's manifest.

    Returns the folder; the original returned the model, which we never hold. Without path_tuned the
    result goes to a temp folder for the checks and the test generation, then is deleted."""
    path_raw = utils.resolve_model_path(path_raw)
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
            raise ValueError(
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
        if test_inference:
            sample_completion(dest, device, max_length=inference_max_length)
    finally:
        if path_tuned is None:
            shutil.rmtree(dest, ignore_errors=True)
    return None if path_tuned is None else str(path_tuned)


def main(argv=None):
    import fire

    fire.Fire({"make_diff": make_diff, "recover": recover}, command=argv)


if __name__ == "__main__":
    from cli import run_fire  # refuses an unknown flag before any work

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_fire({"make_diff": make_diff, "recover": recover}, "weight_diff.py")
