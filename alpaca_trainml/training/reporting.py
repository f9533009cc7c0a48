"""What a training run shows a person: the loss picture, the demo's answers before and after, and its title."""

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


REWARD_KEYS = ("rewards/margins", "rewards/accuracies")  # what DPOTrainer logs besides the loss


def series(log_history, key):
    """[(step, value)] of one logged quantity, in order."""
    return [(h["step"], h[key]) for h in log_history if key in h]


def plot_loss(log_history, path, title):
    """Draw train and eval loss against the step into path; a DPO run's history (rewards/margins and
    rewards/accuracies) gets a second panel with them. Drawing must never fail a run: warn instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rewards = any(series(log_history, k) or series(log_history, f"eval_{k}") for k in REWARD_KEYS)
        fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(13 if rewards else 8, 4.5), squeeze=False)
        ax = axes[0][0]
        for key, label, style in (("loss", "train", "-"), ("eval_loss", "eval", "o--")):
            if series(log_history, key):
                ax.plot(*zip(*series(log_history, key)), style, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("DPO loss (nats/pair)" if rewards else "loss (cross-entropy, nats/token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        if rewards:
            plot_rewards(axes[0][1], log_history)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # a missing font or backend must not cost a finished training run
        logger.warning("could not draw %s: %s", path, e)


def plot_rewards(ax, log_history):
    """Reward margin (chosen minus rejected, left axis) and reward accuracy (share of pairs won, right axis)."""
    right = ax.twinx()
    for prefix, split, style in (("", "train", "-"), ("eval_", "eval", "o--")):
        for key, axis, colour in ((REWARD_KEYS[0], ax, "tab:blue"), (REWARD_KEYS[1], right, "tab:green")):
            if series(log_history, prefix + key):
                axis.plot(*zip(*series(log_history, prefix + key)), style, color=colour, label=f"{split} {key}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward margin (beta * log-ratio)")
    right.set_ylabel("reward accuracy")
    right.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)


def demo_answers(trainer, tokenizer, data_args, max_new_tokens=64):
    """Greedy answers of the model being trained to the first N eval instructions: [(instruction, answer)]."""
    from alpaca_trainml.data.dataset import load_rows
    from alpaca_trainml.generation.decoding import GenParams
    from alpaca_trainml.generation.model import InstructModel

    rows = load_rows(data_args.eval_data_path or data_args.data_path)[: data_args.demo_generations]
    model = InstructModel(model=trainer.model, tokenizer=tokenizer)
    model.model.eval()
    params = GenParams(max_tokens=max_new_tokens, temperature=0)
    answers = []
    for row in rows:
        if "messages" in row:  # a chat: its first user turn, asked alone
            row = {"instruction": next(m["content"] for m in row["messages"] if m["role"] == "user")}
        ids = model.encode_instruction(row["instruction"], row.get("input") or None, truncate=True)
        answers.append((row["instruction"], model.generate([ids], params)[0].text.strip()))
    return answers


def print_demo(before, after, eval_before, eval_after):
    """The answers and eval loss before fine-tuning (after=None), or before and after side by side."""
    print("\nbefore fine-tuning:" if after is None else "\nbefore and after fine-tuning:")
    for (instruction, a), b in zip(before, after or [None] * len(before)):
        print(f"\n### Instruction: {instruction}\n--- before: {a}" + ("" if b is None else f"\n--- after:  {b[1]}"))
    if eval_before is not None:
        print(
            f"\neval loss: before {eval_before:.4f}" + ("" if eval_after is None else f", after {eval_after:.4f}"),
            flush=True,
        )


def title_for(model_args, training_args):
    a = training_args
    scheduler = getattr(
        a.lr_scheduler_type, "value", a.lr_scheduler_type
    )  # an enum: "cosine", not SchedulerType.COSINE
    return (
        f"{Path(str(model_args.model_name_or_path)).name}: lr {a.learning_rate:g}, {scheduler}, "
        f"bs {a.per_device_train_batch_size}x{a.gradient_accumulation_steps}x{a.world_size}, "
        f"epochs {a.num_train_epochs:g}"
    )
