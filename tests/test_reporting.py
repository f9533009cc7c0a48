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
