"""Tests of reporting.py: the loss picture's title, the demo answers through InstructModel."""

import transformers

import train
from alpaca_trainml.training import reporting


def test_loss_picture_title_names_the_scheduler_and_batch():
    argv = [
        "--output_dir",
        "x",
        "--lr_scheduler_type",
        "cosine",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--report_to",
        "none",
    ]
    model_args, _, training_args = transformers.HfArgumentParser(
        (train.ModelArguments, train.DataArguments, train.TrainingArguments)
    ).parse_args_into_dataclasses(args=argv)
    title = reporting.title_for(model_args, training_args)
    assert ", cosine, bs 4x2x1," in title and "SchedulerType" not in title


def test_the_loss_picture_gets_the_mode_the_umask_gives(tmp_path):
    from helpers import umask

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    for mask in (0o022, 0o077):
        with umask(mask):
            reporting.plot_loss(history, tmp_path / f"loss-{mask:o}.png", "title")
        path = tmp_path / f"loss-{mask:o}.png"
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_mode & 0o777 == 0o666 & ~mask
