"""Tests of launch.py: the seed's removed flags, resume checkpoint search."""

import warnings

import transformers

import train
from alpaca_trainml.training import launch


def test_resume_skips_a_checkpoint_that_was_killed_while_saving(tmp_path):
    for step in (2, 9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 9):  # checkpoint-10 has no trainer_state.json: the run died while writing it
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert launch.last_complete_checkpoint(tmp_path) == str(
        tmp_path / "checkpoint-9"
    )  # 10 > 9 numerically, 9 > 10 as text
    assert launch.last_complete_checkpoint(tmp_path / "missing") is None


SEED_ARGS = [
    "--model_name_or_path",
    "m",
    "--data_path",
    "d.json",
    "--bf16",
    "True",
    "--output_dir",
    "o",
    "--num_train_epochs",
    "3",
    "--per_device_train_batch_size",
    "16",
    "--gradient_accumulation_steps",
    "2",
    "--gradient_checkpointing",
    "--evaluation_strategy",
    "no",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2000",
    "--save_total_limit",
    "1",
    "--learning_rate",
    "2e-5",
    "--weight_decay",
    "0.",
    "--warmup_ratio",
    "0.03",
    "--lr_scheduler_type",
    "cosine",
    "--logging_steps",
    "1",
    "--tf32",
    "True",
    "--report_to",
    "none",
    "--fsdp",
    "full_shard auto_wrap",
    "--fsdp_transformer_layer_cls_to_wrap",
    "LlamaDecoderLayer",
]


def test_legacy_flags_map_to_current_arguments_on_cpu():
    argv, notes = launch.translate_legacy_args(SEED_ARGS, has_gpu=False, cpu_bf16="")  # a CPU without native bf16
    assert "--evaluation_strategy" not in argv and "--warmup_ratio" not in argv and "--bf16" not in argv
    assert len(notes) == 6  # gradient checkpointing, eval strategy, warmup, fsdp layer class, bf16, tf32: one each
    assert "--gradient_checkpointing is now --activation_checkpointing" in notes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5.24 warns when --gradient_checkpointing itself is given
        _, _, args = transformers.HfArgumentParser(
            (train.ModelArguments, train.DataArguments, train.TrainingArguments)
        ).parse_args_into_dataclasses(args=argv)
    assert args.activation_checkpointing and args.gradient_checkpointing  # the old name mirrors the new one
    assert args.eval_strategy == "no" and args.warmup_steps == 0.03 and not args.bf16
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.model_max_length == 512 and args.optim == "adamw_torch_fused"


def test_legacy_flags_keep_precision_flags_on_gpu_and_map_group_by_length():
    argv, notes = launch.translate_legacy_args(["--bf16", "True", "--tf32=True", "--group_by_length"], has_gpu=True)
    assert argv == ["--bf16", "True", "--tf32=True", "--train_sampling_strategy", "group_by_length"]
    assert launch.translate_legacy_args(["--bf16", "False"], has_gpu=False, cpu_bf16="avx512_bf16")[1] == []
