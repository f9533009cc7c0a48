"""JSON and JSONL files: read, and write atomically (temp file, fsync, replace). Files and folders written through a
temp name get the mode a plain open()/mkdir() would give under the user's umask, not mkstemp's private 0600/0700:
another account (the server's, the other ranks of a multi-node run) must be able to read what we write."""

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


def current_umask():
    """The process's umask, read without changing it where Linux reports it (os.umask can only set it, and setting
    it to read it would open a window in which another thread creates files with the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(folder=False):
    """The permission bits open() (0666) or mkdir() (0777) give a new file or folder under the current umask."""
    return (0o777 if folder else 0o666) & ~current_umask()


def make_temp_dir(dest):
    """A new temp folder next to dest (to be renamed onto it), with the mode mkdir() would give dest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial.")
    os.chmod(tmp, normal_mode(folder=True))
    return Path(tmp)


def atomic_write(path, write_fn, mode="w"):
    """Call write_fn(fh) on a temp file next to `path`, fsync it, then rename it over `path`.
    A crash leaves either the old file or the new one, never half of one. The file keeps the mode of the one it
    replaces, as open() would; a new one gets open()'s mode under the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.is_file() else normal_mode())
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
