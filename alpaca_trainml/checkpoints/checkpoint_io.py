"""Checkpoints on disk, tensor by tensor: read row slices of any HF folder, write fp32 safetensors shards
atomically. checkpoints/weight_diff.py builds on these so that no step holds a whole model in memory."""

import contextlib
import json
import os
import shutil
import struct
from math import prod
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from tqdm import tqdm

from alpaca_trainml import jsonio
from alpaca_trainml.cli import UsageError


class Checkpoint:
    """Tensor names, shapes and row slices of an HF folder: safetensors or .bin, one file or sharded."""

    LAYOUTS = (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    )

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UsageError(f"{folder}: no such folder" if not self.folder.exists() else f"{folder}: not a folder")
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
            raise UsageError(
                f"{self.folder}: found neither model.safetensors(.index.json) nor "
                "pytorch_model.bin(.index.json); give the folder save_pretrained wrote"
            )
        self.shapes = {}
        for path in sorted(set(self.files.values())):
            if not path.is_file():
                raise UsageError(f"{path}: listed in the index of {self.folder} but missing")
            self.shapes.update({k: s for k, s in self._scan(path).items() if self.files.get(k) == path})
        if self.files.keys() - self.shapes.keys():
            missing = sorted(self.files.keys() - self.shapes.keys())
            raise UsageError(f"{self.folder}: the index lists tensors its files lack: {missing[:5]}")

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


def row_chunks(shape, chunk_bytes):
    """(start, stop) row ranges of about chunk_bytes of fp32 each; chunk_bytes=None: the whole tensor."""
    if not shape:
        return [(None, None)]
    step = shape[0] if chunk_bytes is None else max(1, chunk_bytes // (4 * prod(shape[1:])))
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], max(step, 1))] or [(0, 0)]


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
        jsonio.jdump(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, out_dir / "model.safetensors.index.json"
        )


@contextlib.contextmanager
def staging(dest, inputs):
    """Yield a temp folder next to dest; rename it to dest only if the block finishes without error."""
    dest = Path(dest).resolve()
    if any(Path(p).resolve() == dest for p in inputs):
        raise UsageError(f"{dest} is one of the input folders; write the output to a new folder")
    # deviation: the original wrote into an existing folder; we refuse one with files in it
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} already exists and is not an empty folder; remove it or choose another path")
    tmp = jsonio.make_temp_dir(dest)
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
    jsonio.jdump(config, Path(dst) / "config.json")
    if (Path(src) / "generation_config.json").is_file():
        shutil.copyfile(Path(src) / "generation_config.json", Path(dst) / "generation_config.json")
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
