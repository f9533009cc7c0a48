"""Adapter folders (what train.py --use_peft saves): recognising one, reading its config and base, and loading it
back onto its base for inference. Serving, export and the checkpoint tools use these; training/lora.py builds the
adapters.
"""

import json
from pathlib import Path

import transformers

from alpaca_trainml import models
from alpaca_trainml.cli import UsageError
from alpaca_trainml.data.special_tokens import missing_special_tokens, smart_tokenizer_and_embedding_resize

ADAPTER_CONFIG = "adapter_config.json"


def base_name(name_or_path):
    """What adapter_config.json records as the base: the embedded model's name, a folder's absolute path, a hub id."""
    if name_or_path in (None, "", models.EMBEDDED_MODEL):
        return models.EMBEDDED_MODEL
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def is_adapter(path):
    """True for a folder train.py --use_peft wrote (or one of its checkpoints)."""
    return path is not None and (Path(str(path)) / ADAPTER_CONFIG).is_file()


def adapter_config(path):
    """The adapter's peft config as a dict; a LoRA adapter only (what merge and serving understand)."""
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise UsageError(f"{Path(path) / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    return config


def base_of(path, base_model=None):
    """The base model of an adapter folder: base_model if given, else what its adapter_config.json records."""
    base = base_model or adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{Path(path) / ADAPTER_CONFIG} names no base model; give it with --base_model")
    return base


def resized_base(path, base_model=None, **kwargs):
    """(base model, tokenizer) as train.py had them before the adapter: the special tokens added, the new rows mean-
    initialised. Checks that the adapter's tokenizer is the one this base grows into."""
    base = base_of(path, base_model)
    models.check_checkpoint(base)
    model = models.from_pretrained(transformers.AutoModelForCausalLM, base, **kwargs)
    tokenizer = models.from_pretrained(transformers.AutoTokenizer, base)
    smart_tokenizer_and_embedding_resize(missing_special_tokens(tokenizer), tokenizer, model)
    adapter_tokens = transformers.AutoTokenizer.from_pretrained(path)
    check_vocab(path, len(adapter_tokens), base, len(tokenizer))
    return model, adapter_tokens


def check_vocab(path, adapter_tokens, base, base_tokens):
    """The adapter's tokenizer must be the one the base grows into with train.py's special tokens."""
    if adapter_tokens != base_tokens:
        raise UsageError(
            f"{path}: its tokenizer has {adapter_tokens} tokens, but the base {base} with the special tokens "
            f"train.py adds has {base_tokens}: this adapter was trained on another base; give it with --base_model"
        )


def load_merged(path, base_model=None, **kwargs):
    """(model, tokenizer) of an adapter folder: its base plus the adapter, merged into plain weights for fast
    generation. kwargs go to the base's from_pretrained (dtype, device_map)."""
    from peft import PeftModel

    model, tokenizer = resized_base(path, base_model, **kwargs)
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model, tokenizer
