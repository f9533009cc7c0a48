"""JSON and JSONL files: read, and write atomically (temp file, fsync, replace)."""

import io
import json
import os
import tempfile
from pathlib import Path


def jload(f, mode="r"):
    """Load a JSON file (or an open file). A `.jsonl` path is read as one JSON value per line."""
    if isinstance(f, io.IOBase):
        return json.load(f)
    path = Path(f)
    with open(path, mode, encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in fh if line.strip()]
        return json.load(fh)


def atomic_write(path, write_fn, mode="w"):
    """Call write_fn(fh) on a temp file next to `path`, fsync it, then rename it over `path`.
    A crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jdump(obj, f, mode="w", indent=4, default=str):
    """Write obj as JSON to path f, atomically (temp file, fsync, replace)."""
    atomic_write(f, lambda fh: json.dump(obj, fh, indent=indent, default=default, ensure_ascii=False), mode)
