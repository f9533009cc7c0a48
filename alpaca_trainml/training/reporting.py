"""What a training run shows a person: the loss picture, the demo's answers before and after, and its title."""

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def plot_loss(log_history, path, title):
    """Draw train and eval loss against the step into path. Drawing must never fail a run: warn instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train_pts = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
        eval_pts = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for pts, label, style in ((train_pts, "train", "-"), (eval_pts, "eval", "o--")):
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (cross-entropy, nats/token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # a missing font or backend must not cost a finished training run
        logger.warning("could not draw %s: %s", path, e)


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
