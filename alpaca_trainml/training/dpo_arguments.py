"""train_dpo.py's flags: train.py's model flags (LoRA/QLoRA included) plus --ref_model, the preference data, and TRL's
DPOConfig with this project's defaults; parsed and checked before anything loads."""

import dataclasses
import logging
import sys
from dataclasses import dataclass, field

import transformers
from trl import DPOConfig

from alpaca_trainml import REPO_ROOT, cli
from alpaca_trainml.models import DEFAULT_MODEL_MAX_LENGTH
from alpaca_trainml.training import lora
from alpaca_trainml.training.arguments import LEGACY_CONFIG_KEYS, ArgumentParser, ModelArguments
from alpaca_trainml.training.launch import cpu_world_size, setup_cpu_ranks, translate_legacy_args

SAMPLE_DPO = REPO_ROOT / "data" / "sample_dpo.json"
SAMPLE_DPO_EVAL = REPO_ROOT / "data" / "sample_dpo_eval.json"


logger = logging.getLogger(__name__)


@dataclass
class DPOModelArguments(ModelArguments):
    ref_model: str | None = field(
        default=None,
        metadata={
            "help": "The reference model the rewards are measured against (HF id or folder). Default: the policy's "
            "own initial weights; with --use_peft, the base with the adapter disabled."
        },
    )


@dataclass
class DPODataArguments:
    data_path: str = field(
        default=None,
        metadata={
            "help": "Preference pairs, JSON or JSONL: ShareGPT (conversations + chosen + rejected, as LLaMA-Factory's "
            "dpo_en_demo.json) or TRL's prompt/chosen/rejected. Default: data/sample_dpo.json."
        },
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Held-out pairs (either shape): reward accuracy and margin before and after training."},
    )
    val_set_size: int = field(
        default=0, metadata={"help": "Hold out this many training pairs (seeded shuffle) for evaluation."}
    )


@dataclass
class DPOTrainingArguments(DPOConfig):
    """TRL's DPOConfig (--beta, --loss_type, --max_length, ...). Defaults that differ from TRL's are train.py's: fp32
    unless --bf16 True (the seed's --bf16 on a CPU without native bf16 is dropped, as in train.py), no gradient
    checkpointing unless asked for, torch's AdamW."""

    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    bf16: bool | None = field(
        default=False, metadata={"help": "bf16 mixed precision (TRL turns it on by default; train.py does not)."}
    )
    # None, not False: transformers 5.24 warns on any explicit value of this deprecated alias of
    # activation_checkpointing (TRL sets True); None leaves it off unless --gradient_checkpointing is given.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass: less memory, about 20%% slower.",
            "nargs": "?",
            "const": True,
        },
    )
    max_length: int | None = field(
        default=DEFAULT_MODEL_MAX_LENGTH,
        metadata={
            "help": "Tokens of prompt + answer, for chosen and rejected each; longer ones lose their end. A pair whose "
            "prompt alone reaches it is dropped. --model_max_length is read as this flag."
        },
    )

    @property
    def model_max_length(self):
        """What train.py calls it: load_model_and_tokenizer gives it to the tokenizer."""
        return self.max_length

    def __post_init__(self):
        if cpu_world_size() > 1:
            setup_cpu_ranks(self)
        super().__post_init__()


ARGUMENT_CLASSES = (DPOModelArguments, DPODataArguments, DPOTrainingArguments)


def alias_max_length(argv):
    """train.py's --model_max_length N is --max_length N here: (argv, notes)."""
    out, notes = [], []
    for arg in argv:
        if arg == "--model_max_length" or arg.startswith("--model_max_length="):
            out.append(arg.replace("--model_max_length", "--max_length", 1))
            notes.append("--model_max_length is read as --max_length (prompt + answer tokens)")
        else:
            out.append(arg)
    return out, notes


def parse_args(argv=None):
    """(model_args, data_args, training_args, notes); argv may start with a config file, as train.py's."""
    parser = ArgumentParser(ARGUMENT_CLASSES)
    argv = cli.expand_config(
        list(sys.argv[1:] if argv is None else argv), parser, (*LEGACY_CONFIG_KEYS, "model_max_length")
    )
    argv, notes = translate_legacy_args(argv)
    argv, more = alias_max_length(argv)
    model_args, data_args, training_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:
        raise cli.unknown_flags_error(
            unknown, [f"--{f.name}" for dc in ARGUMENT_CLASSES for f in dataclasses.fields(dc)] + ["--model_max_length"]
        )
    check_ranges(data_args, training_args)
    lora.check_args(model_args, training_args)
    if data_args.data_path is None:
        data_args.data_path = str(SAMPLE_DPO)
        if data_args.eval_data_path is None and not data_args.val_set_size:
            data_args.eval_data_path = str(SAMPLE_DPO_EVAL)
    if data_args.eval_data_path and data_args.val_set_size:
        raise ValueError("give --eval_data_path or --val_set_size, not both")
    if (data_args.eval_data_path or data_args.val_set_size) and training_args.eval_strategy == "no":
        training_args.eval_strategy = transformers.IntervalStrategy.EPOCH
        if training_args.process_index == 0:  # what train_dpo.py does with its sample data: not a warning
            logger.info("evaluation data given: evaluating once per epoch (--eval_strategy epoch)")
    return model_args, data_args, training_args, notes + more


def check_ranges(data_args, training_args):
    """Refuse values that cannot work, all at once, before anything loads."""
    a = training_args
    problems = [
        f"--{name} must be {rule}, got {value}"
        for name, value, ok, rule in (
            ("beta", a.beta, a.beta > 0, "above 0"),
            ("max_length", a.max_length, a.max_length is None or a.max_length >= 8, "at least 8"),
            ("val_set_size", data_args.val_set_size, data_args.val_set_size >= 0, "0 or more"),
            ("learning_rate", a.learning_rate, a.learning_rate > 0, "above 0"),
            ("num_train_epochs", a.num_train_epochs, a.num_train_epochs > 0, "above 0"),
        )
        if not ok
    ]
    if problems:
        raise ValueError("; ".join(problems))
