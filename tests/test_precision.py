"""Tests of precision.py: native-bf16 detection, the dtype rule, and --bf16 on a CPU with and without native bf16."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import make_rows

import train
from alpaca_trainml import precision
from alpaca_trainml.training import launch

X86_CPUINFO = (
    "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n"
)
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
OLD_X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has the given /proc/cpuinfo flags (detection is cached per process: clear it around)."""

    def _pretend(flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
        precision.cpu_bf16_flag.cache_clear()

    yield _pretend
    precision.cpu_bf16_flag.cache_clear()


@pytest.mark.parametrize(
    "text, expected",
    [(X86_CPUINFO, "avx512_bf16"), (ARM_CPUINFO, "bf16"), (OLD_X86_CPUINFO, None)],
    ids=["sapphire-rapids", "neoverse-v1", "skylake"],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, text, expected, cpu_with):
    (tmp_path / "cpuinfo").write_text(text)
    assert precision.cpu_flags(tmp_path / "missing") == set()  # not Linux: no flags, no crash
    cpu_with(precision.cpu_flags(tmp_path / "cpuinfo"))
    assert precision.cpu_bf16_flag() == expected
    assert precision.cpu_has_native_bf16() is (expected is not None)


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(cpu_with):
    cpu_with({"avx512f", "amx_bf16"})
    assert precision.auto_dtype("cpu") == torch.bfloat16
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16
    cpu_with({"avx512f", "avx2"})  # bf16 emulated: slower than fp32
    assert precision.auto_dtype("cpu") == torch.float32
    assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # asked for by name: given
    assert precision.resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'bf17': give one of auto, bfloat16, float32"):
        precision.resolve_dtype("bf17")


def test_bf16_flag_trains_in_autocast_on_a_bf16_cpu_and_is_dropped_elsewhere():
    argv, notes = launch.translate_legacy_args(["--bf16", "True", "--tf32", "True"], has_gpu=False, cpu_bf16="amx_bf16")
    assert argv == ["--bf16", "True", "--use_cpu", "True"]  # the Trainer refuses bf16 with no GPU unless use_cpu
    assert len(notes) == 1 and "ignoring --tf32 True" in notes[0]  # TF32 is a GPU matmul mode: nothing to do on a CPU
    # bf16 kept as asked is no note (notes are warnings); the trainer's log line names the precision instead
    assert precision.training_precision(SimpleNamespace(bf16=True, fp16=False)) == "bf16 mixed precision (autocast)"
    assert precision.training_precision(SimpleNamespace(bf16=False, fp16=False)) == "fp32"
    argv, notes = launch.translate_legacy_args(["--bf16", "--fp16", "True"], has_gpu=False, cpu_bf16="")
    assert argv == []
    assert notes == [
        "no GPU found: ignoring --bf16 True and training in fp32 on CPU (this CPU has no native bf16)",
        "no GPU found: ignoring --fp16 True and training in fp32 on CPU",  # fp16 on a CPU is slower than fp32
    ]


def run_steps(tmp_path, data, model_dir, bf16):
    out = tmp_path / ("bf16" if bf16 else "fp32")
    trainer = train.train(
        [
            *("--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(out)),
            *("--max_steps", "6", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3"),
            *("--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--model_max_length", "128"),
            *("--bf16", str(bf16), "--seed", "3", "--disable_tqdm", "True"),
        ]
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return trainer, [h["loss"] for h in history if "loss" in h]


def test_a_short_bf16_run_takes_the_autocast_path_and_matches_fp32_losses(
    tmp_path, tiny_llama_dir, data_file, cpu_with
):
    cpu_with({"avx512_bf16"})  # bf16 autocast also runs (emulated, slower) on a CPU without it: the test runs anywhere
    data = data_file(make_rows(32, seed=4))
    trainer, bf16_losses = run_steps(tmp_path, data, tiny_llama_dir, bf16=True)
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.native_amp
    assert next(trainer.model.parameters()).dtype == torch.float32  # mixed precision: fp32 master weights
    trainer, fp32_losses = run_steps(tmp_path, data, tiny_llama_dir, bf16=False)
    assert trainer.accelerator.mixed_precision == "no"
    assert len(bf16_losses) == len(fp32_losses) == 6
    assert bf16_losses != fp32_losses  # the matmuls really ran in bf16
    # bf16 keeps 8 significant bits: rounding each product costs at most 2^-9 = 0.2% relative. Autocast accumulates
    # matmuls and computes log-softmax and loss in fp32, so the errors stay at that scale and partly cancel: the
    # per-step losses of this run agree within 0.03% (measured here). 1% leaves room for other CPUs' kernels and is
    # still well under what these 6 steps change the loss by (9%: 6.02 -> 5.47), so a step that went wrong fails.
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.01)
    assert fp32_losses[-1] < 0.95 * fp32_losses[0]  # the steps trained, so the comparison is not trivial
