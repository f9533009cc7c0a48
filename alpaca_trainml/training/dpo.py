"""Preference tuning with TRL's DPOTrainer on train.py's rails: the same model loading, LoRA/QLoRA, DeepSpeed, FSDP,
CPU ranks, chat template, resume and loss.png.

The reference model is the policy's initial weights, loaded a second time the way the policy was (special tokens
added, new rows mean-initialised), so DeepSpeed and FSDP can prepare it like the policy; with --use_peft it is the
base with the adapter disabled, and no second copy is loaded.
"""

import dataclasses
import logging
from pathlib import Path

import transformers
from trl import DPOTrainer

from alpaca_trainml import cli, models, precision
from alpaca_trainml.data import prompts
from alpaca_trainml.data.dataset import split_rows
from alpaca_trainml.data.preference import load_pairs, to_trl_rows
from alpaca_trainml.data.special_tokens import missing_special_tokens, smart_tokenizer_and_embedding_resize
from alpaca_trainml.training import lora
from alpaca_trainml.training.dpo_arguments import parse_args
from alpaca_trainml.training.launch import CpuFsdpMixin, close_ranks, find_resume_checkpoint
from alpaca_trainml.training.reporting import plot_loss, title_for
from alpaca_trainml.training.sft import load_model_and_tokenizer

logger = logging.getLogger(__name__)


class PreferenceTrainer(CpuFsdpMixin, DPOTrainer):
    """DPOTrainer, with an adapter's reference taken as the base with the adapter disabled, and --fsdp on CPU ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Given a PeftModel and no reference, TRL copies the adapter into a second one, "ref", for adapters trained
        # before. Ours is new (lora_B = 0), so the base with adapters disabled is the same reference, as with TRL's
        # own peft_config path; the copy would only cost memory and be saved beside the adapter.
        peft_config = getattr(self.model, "peft_config", {})
        if "ref" in peft_config and self.ref_model is None:
            self.model.delete_adapter("ref")


def load_policy(model_args, training_args):
    """(model, tokenizer) as train.py loads them, but with --use_peft the adapter trains no rows of the special tokens
    train.py adds: TRL computes the log-probabilities from lm_head.weight itself, past peft's trainable-token wrapper.
    Those rows stay the mean-initialised ones that adapters.resized_base rebuilds under the adapter; [PAD] is masked."""
    if not model_args.use_peft:
        return load_model_and_tokenizer(model_args, training_args)
    model, tokenizer = load_model_and_tokenizer(dataclasses.replace(model_args, use_peft=False), training_args)
    return lora.add_adapters(model, model_args, training_args, new_token_ids=[]), tokenizer


def load_data(data_args, seed=42):
    """(train_pairs, eval_pairs or None), checked before any model loads."""
    pairs = load_pairs(data_args.data_path)
    if data_args.val_set_size:
        return split_rows(pairs, data_args.val_set_size, seed)
    if data_args.eval_data_path:
        return pairs, load_pairs(data_args.eval_data_path)
    return pairs, None


def load_reference(model_args, training_args, tokenizer):
    """The frozen reference model, or None with --use_peft and no --ref_model (the adapter-disabled base)."""
    if model_args.use_peft and not model_args.ref_model:
        return None
    name = model_args.ref_model or model_args.model_name_or_path
    kwargs = dict(cache_dir=training_args.cache_dir)
    model = models.from_pretrained(transformers.AutoModelForCausalLM, name, **kwargs, **lora.load_kwargs(model_args))
    ref_tokenizer = models.from_pretrained(transformers.AutoTokenizer, name, **kwargs)
    smart_tokenizer_and_embedding_resize(missing_special_tokens(ref_tokenizer), ref_tokenizer, model)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"--ref_model {name}: its tokenizer ({len(ref_tokenizer)} tokens) is not the policy's ({len(tokenizer)}); "
            "the reference must share the policy's vocabulary"
        )
    model.requires_grad_(False)
    return model.eval()


def make_datasets(pairs, tokenizer):
    """datasets.Dataset of prompt/chosen/rejected strings for TRL: (train, eval or None)."""
    from datasets import Dataset

    train_pairs, eval_pairs = pairs
    style = prompts.load_style(tokenizer)  # the one load_model_and_tokenizer installed
    train = Dataset.from_list(to_trl_rows(train_pairs, tokenizer, style))
    return train, (Dataset.from_list(to_trl_rows(eval_pairs, tokenizer, style)) if eval_pairs else None)


def held_out_report(trainer):
    """Reward accuracy, mean reward margin and loss on the held-out pairs (TRL's eval metrics). After training, the
    Trainer's own end-of-epoch evaluation of the final weights is reused rather than run again."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_rewards/accuracies" in h), None)
    done = trainer.state.global_step > 0 and last is not None and last.get("step") == trainer.state.global_step
    metrics = last if done else trainer.evaluate()
    return dict(
        accuracy=metrics["eval_rewards/accuracies"],
        margin=metrics["eval_rewards/margins"],
        loss=metrics["eval_loss"],
        metrics={k: v for k, v in metrics.items() if k.startswith("eval_")},
    )


def print_report(before, after):
    """Held-out reward accuracy, margin and loss before and after training, as make demo-dpo prints them."""
    print(
        f"\nheld-out reward accuracy: before {before['accuracy']:.3f}, after {after['accuracy']:.3f} "
        "(before training the policy is the reference: every reward is 0 and no pair is won)\n"
        f"held-out mean reward margin: before {before['margin']:.4f}, after {after['margin']:.4f}\n"
        f"held-out DPO loss: before {before['loss']:.4f}, after {after['loss']:.4f}",
        flush=True,
    )


def log_setup(trainer, n_train, n_eval):
    """Rank 0: ranks, backend, and how many pairs TRL dropped because the prompt alone reached --max_length."""
    if trainer.args.process_index != 0:
        return
    args = trainer.args
    where = (args.world_size, trainer.accelerator.distributed_type, args.device, precision.training_precision(args))
    logger.info("%d rank(s), %s, on %s, %s", *where)
    kept = len(trainer.train_dataset)
    kept_eval = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    if kept < n_train or kept_eval < n_eval:
        logger.warning(
            "dropped %d training and %d eval pair(s) whose prompt alone reaches --max_length %s",
            n_train - kept,
            n_eval - kept_eval,
            trainer.args.max_length,
        )
    if kept == 0:
        raise cli.UserError(f"no training pair is left: every prompt reaches --max_length {trainer.args.max_length}")


def train_dpo(argv=None):
    """Parse the flags, check the data, load the policy and reference, run DPO, save. Mistakes in what the user gave
    raise cli.UserError before the model loads."""
    with cli.user_errors():
        model_args, data_args, training_args, notes = parse_args(argv)
        for note in notes:
            if training_args.process_index == 0:
                logger.warning(note)
        pairs = load_data(data_args, training_args.seed)  # before the model: a bad row costs seconds, not minutes
        model, tokenizer = load_policy(model_args, training_args)
        ref_model = load_reference(model_args, training_args, tokenizer)
        train_set, eval_set = make_datasets(pairs, tokenizer)
    trainer = PreferenceTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    log_setup(trainer, len(pairs[0]), len(pairs[1] or []))
    before = held_out_report(trainer) if eval_set is not None else None
    resume = find_resume_checkpoint(training_args)
    if resume and training_args.process_index == 0:
        logger.warning("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    if before is not None:  # train() starts a fresh history: the untrained model's eval is step 0
        trainer.state.log_history.insert(0, {"step": 0, **before["metrics"]})
    trainer.save_state()
    trainer.save_model(output_dir=training_args.output_dir)
    after = held_out_report(trainer) if eval_set is not None else None  # every rank: evaluate() is collective
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)  # with the chat template the prompts were rendered by
        title = "DPO " + title_for(model_args, training_args) + f", beta {training_args.beta:g}"
        if training_args.max_steps > 0:  # it ends the run before num_train_epochs, which the title names
            title += f", max_steps {training_args.max_steps}"
        plot_loss(trainer.state.log_history, Path(training_args.output_dir) / "loss.png", title)
        if before is not None:
            print_report(before, after)
    close_ranks()
    return trainer
