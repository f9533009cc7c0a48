"""What produced a run folder: per stage, the resolved config, the sha256 of every input and output file, the seed,
the versions, the device and the wall time, in RUN/manifest.json (written atomically: a kill leaves the old one).

A stage's fingerprint hashes its config, its inputs and the fingerprint of the stage before it, so a change anywhere
reruns that stage and every later one, and nothing else."""

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from alpaca_trainml import REPO_ROOT, jsonio

MANIFEST = "manifest.json"
VERSIONED = ("torch", "transformers", "deepspeed", "peft", "trl", "accelerate", "gguf")
CHUNK = 1 << 20  # bytes read at a time while hashing


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(path):
    """{relative path: sha256} of a file, or of every file under a folder (sorted; hidden temp files left out)."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {str(p.relative_to(path)): sha256_file(p) for p in files}


def hash_inputs(paths):
    """{path as given: sha256 or {file: sha256}} of the input files and folders a stage reads (None: not a path)."""
    out = {}
    for name in paths:
        p = Path(name)
        if p.is_file():
            out[str(name)] = sha256_file(p)
        elif p.is_dir():
            out[str(name)] = hash_files(p)
    return out


def fingerprint(*parts):
    """A short stable hash of JSON-able parts (dict keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit():
    """The repository's commit (with '+dirty' when tracked files changed), or None outside a git checkout."""
    try:
        run = dict(cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def versions():
    """Python and the libraries that decide the numbers, and the repository's commit."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["git_commit"] = git_commit()
    return found


def device():
    """Where the stages ran: the GPUs by name, else the CPU and torch's thread count."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"kind": "cuda", "gpus": names, "cuda": torch.version.cuda}
    return {"kind": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def load(run_dir):
    """The manifest of a run folder ({"stages": {}} when there is none yet)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {"stages": {}}
    return jsonio.jload(path)


def save(run_dir, manifest):
    jsonio.jdump(manifest, Path(run_dir) / MANIFEST, indent=2)


def outputs_intact(run_dir, entry):
    """Whether a stage's folder still holds exactly the files its manifest entry recorded."""
    folder = Path(run_dir) / entry["name"]
    return folder.is_dir() and hash_files(folder) == entry.get("outputs")


def environment():
    """The settings outside the recipe that change the numbers: thread counts and determinism switches."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")
    return {k: os.environ.get(k) for k in keys if os.environ.get(k) is not None}
