"""Supervised fine-tuning: load the model and data, train with the HF Trainer, save, plot, show the demo answers."""

import logging
from pathlib import Path

import transformers

from alpaca_trainml import cli, models, precision
from alpaca_trainml.data import prompts
from alpaca_trainml.data.collators import DataCollatorForSupervisedDataset, make_collator
from alpaca_trainml.data.dataset import (
    load_data,
    make_supervised_data_module,
)
from alpaca_trainml.data.show_labels import show_labels
from alpaca_trainml.data.special_tokens import (
    missing_special_tokens,
    smart_tokenizer_and_embedding_resize,
)
from alpaca_trainml.training import lora, loss, segment_attention
from alpaca_trainml.training.arguments import parse_args
from alpaca_trainml.training.launch import (
    CpuFsdpMixin,
    close_ranks,
    find_resume_checkpoint,
)
from alpaca_trainml.training.reporting import demo_answers, plot_loss, print_demo, title_for

logger = logging.getLogger(__name__)


class SupervisedTrainer(CpuFsdpMixin, transformers.Trainer):
    """The HF Trainer; evaluation keeps the original padded collator, so eval_loss is the original's to the digit
    (the Trainer weights each eval batch by its number of rows, which packing would change)."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # one process, a plain model, the default loss: the LM head and softmax on supervised positions only
        # (training/loss.py; the same loss and gradients). Wrapped models, several ranks, eval: the Trainer's way.
        if return_outputs or self.accelerator.num_processes > 1 or not loss.applies(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.accelerator.autocast():  # --bf16/--fp16: it calls the decoder past the forward accelerate wrapped
            return loss.supervised_loss(model, inputs, num_items_in_batch)

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator


def load_tokenizer(model_args, training_args):
    return models.from_pretrained(
        transformers.AutoTokenizer,
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )


def has_chat_rows(rows):
    """Whether load_data's (train rows, eval rows or None) hold a chat."""
    return any("messages" in r for part in rows if part for r in part)


def load_model_and_tokenizer(model_args, training_args, prompt_style=prompts.AUTO, chat_data=False):
    """(model, tokenizer): the special tokens added, the adapter on with --use_peft, and the prompt style's chat
    template installed (prompts.choose_style; chat_data: the training data holds chats)."""
    name = model_args.model_name_or_path
    model = models.from_pretrained(
        transformers.AutoModelForCausalLM, name, cache_dir=training_args.cache_dir, **lora.load_kwargs(model_args)
    )
    tokenizer = load_tokenizer(model_args, training_args)
    style = prompts.choose_style(prompt_style, tokenizer, chat_data)
    added = missing_special_tokens(tokenizer)
    smart_tokenizer_and_embedding_resize(added, tokenizer, model)
    if model_args.use_peft:  # the base stays frozen; the adapter also trains the rows just added
        model = lora.add_adapters(
            model, model_args, training_args, tokenizer.convert_tokens_to_ids(list(added.values()))
        )
    style.install(tokenizer)  # every checkpoint says how to prompt it: serve.py, vLLM, llama.cpp read this
    return model, tokenizer


def print_labels(model_args, data_args, training_args, rows):
    """--show_labels: tokenize as training would, with the tokenizer alone, and print the first examples."""
    tokenizer = load_tokenizer(model_args, training_args)
    style = prompts.choose_style(data_args.prompt_style, tokenizer, has_chat_rows(rows))
    tokenizer.add_special_tokens(missing_special_tokens(tokenizer))
    style.install(tokenizer)
    logger.info("prompt style: %s", style.name)
    data_module = make_supervised_data_module(tokenizer, data_args, training_args.seed, rows=rows)
    show_labels(data_module["train_dataset"], tokenizer, data_args.show_labels)


def train(argv=None):
    """Parse the flags, check the data, load the model, fine-tune, save. Mistakes in what the user gave (flags,
    files, rows, the model folder) raise cli.UserError before training starts."""
    with cli.user_errors():
        model_args, data_args, training_args, notes = parse_args(argv)
        for note in notes:
            if training_args.process_index == 0:
                logger.warning(note)
        rows = load_data(data_args, training_args.seed)  # before the model: a bad row costs seconds, not minutes
        if data_args.show_labels:
            if training_args.process_index == 0:
                print_labels(model_args, data_args, training_args, rows)
            return None
        model, tokenizer = load_model_and_tokenizer(
            model_args, training_args, data_args.prompt_style, has_chat_rows(rows)
        )
        data_module = make_supervised_data_module(tokenizer, data_args, training_args.seed, rows=rows)
    if data_args.padding_free:
        segment_attention.use_segments(model)  # under sdpa: one row per micro-batch, attention per example
        collator = make_collator(tokenizer, model.config, training_args.model_max_length)
        data_module["data_collator"] = collator
        data_module["eval_data_collator"] = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
        if training_args.process_index == 0:
            if collator.attention == "segments":
                logger.info("padding-free batches: each micro-batch in one row, attention within each example")
            else:
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
            "%d rank(s), %s, on %s, %s",
            training_args.world_size,
            trainer.accelerator.distributed_type,
            training_args.device,
            precision.training_precision(training_args),
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
    segment_attention.restore_sdpa(model)  # what is saved, and the demo's answers, use transformers' sdpa
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
