"""How train.py is launched: the seed's removed flags mapped to today's, CPU-only multi-rank setup, and resume.

The original README's and the trainML fork's commands must run verbatim on transformers 5, so
translate_legacy_args rewrites their flags before HfArgumentParser sees them (each mapping is logged once).
"""

import datetime
import logging
import os
from pathlib import Path

import torch

from alpaca_trainml import precision
from alpaca_trainml.cli import UsageError

logger = logging.getLogger(__name__)


def cpu_world_size():
    """Number of ranks when launched by deepspeed/torchrun on a machine with no GPU, else 0."""
    if torch.cuda.is_available() or int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return 0
    return int(os.environ.get("WORLD_SIZE", 1))


def setup_cpu_ranks(args):
    """Several ranks, no GPU. accelerate would give each DeepSpeed rank a world of its own (batch-size mismatch) and
    would refuse --fsdp, so set up gloo here, as the GPU path sets up NCCL."""
    from accelerate import PartialState

    if args.deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets around its own PartialState
        try:
            PartialState(backend="gloo", timeout=datetime.timedelta(seconds=args.ddp_timeout))
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        if args.accelerator_config is None:
            args.accelerator_config = {}
        if not isinstance(args.accelerator_config, dict):
            raise UsageError("with no GPU, give --accelerator_config as a JSON dict (or not at all) under --deepspeed")
        args.accelerator_config["use_configured_state"] = True
    else:
        args.use_cpu = True  # accelerate's MULTI_CPU over gloo; FSDP is switched on in SupervisedTrainer


def close_ranks():
    """End a multi-rank run in step: every rank waits for the others, then the process group is destroyed. Left to
    interpreter exit, a rank's gloo threads can be torn down while a peer still talks to them ("terminate called
    without an active exception" on one node, and the other then waits out torchrun's 300 s exit barrier)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# Flags from the original README and the trainML fork that current transformers rejects.
LEGACY_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",  # renamed in transformers 4.46, removed in 5
    "--warmup_ratio": "--warmup_steps",  # transformers 5: a float below 1 is a ratio of total steps
    # transformers 5.24 renamed these and warns (FutureWarning) on any value given under the old name
    "--gradient_checkpointing": "--activation_checkpointing",
    "--gradient_checkpointing_kwargs": "--activation_checkpointing_kwargs",
}


def _split_flag(arg):
    """'--x=v' -> ('--x', 'v'); '--x' -> ('--x', None)."""
    return tuple(arg.split("=", 1)) if arg.startswith("--") and "=" in arg else (arg, None)


def _take_value(argv, i):
    """The value of argv[i]: inline (--x=v), the next token, or None for a bare boolean flag: (value, next_i)."""
    flag, inline = _split_flag(argv[i])
    if inline is not None:
        return inline, i + 1
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return argv[i + 1], i + 2
    return None, i + 1


def translate_legacy_args(argv, has_gpu=None, cpu_bf16=None):
    """Rewrite the seed's command-line flags for today's transformers. Returns (argv, notes). cpu_bf16: the CPU flag
    that shows native bf16 (precision.cpu_bf16_flag(), looked up when None; "" for none)."""
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    out, notes, layer_cls, i = [], [], None, 0
    while i < len(argv):
        flag, _ = _split_flag(argv[i])
        if flag in LEGACY_FLAGS:
            value, i = _take_value(argv, i)
            out += [LEGACY_FLAGS[flag]] + ([] if value is None else [value])  # None: a bare boolean flag
            shown = "" if value is None else f" {value}"
            notes.append(f"{flag}{shown} is now {LEGACY_FLAGS[flag]}{shown}")
        elif flag == "--fsdp_transformer_layer_cls_to_wrap":
            layer_cls, i = _take_value(argv, i)
            notes.append(
                f'{flag} {layer_cls} is now --fsdp_config \'{{"transformer_layer_cls_to_wrap": ["{layer_cls}"]}}\''
            )
        elif flag == "--group_by_length":  # transformers 5 folded it into the sampler choice
            value, i = _take_value(argv, i)
            if value is None or value.lower() in ("true", "1", "yes"):
                out += ["--train_sampling_strategy", "group_by_length"]
                notes.append(f"{flag} is now --train_sampling_strategy group_by_length")
        elif flag in ("--bf16", "--tf32", "--fp16") and not has_gpu:
            value, i = _take_value(argv, i)
            if value is None or value.lower() in ("true", "1", "yes"):
                extra, note = _cpu_precision(flag, value, cpu_bf16)
                out += extra
                notes += [note] if note else []
        else:
            out.append(argv[i])
            i += 1
    if layer_cls is not None:
        if any(_split_flag(a)[0] == "--fsdp_config" for a in out):
            raise UsageError("give --fsdp_transformer_layer_cls_to_wrap inside --fsdp_config, not both")
        out += ["--fsdp_config", f'{{"transformer_layer_cls_to_wrap": ["{layer_cls}"]}}']
    return out, notes


def _cpu_precision(flag, value, cpu_bf16):
    """--bf16/--tf32/--fp16 True with no GPU: bf16 autocast where the CPU has it natively (the Trainer wants use_cpu
    for bf16 without a GPU), else dropped: fp16 and emulated bf16 are slower than fp32 on a CPU. (argv, note or None)"""
    cpu_bf16 = precision.cpu_bf16_flag() if cpu_bf16 is None else cpu_bf16
    if flag == "--bf16" and cpu_bf16:  # kept as asked, so no note: the trainer's log line names the precision
        return ["--bf16", "True", "--use_cpu", "True"], None
    why = " (this CPU has no native bf16)" if flag == "--bf16" else ""
    return [], f"no GPU found: ignoring {flag} {value or 'True'} and training in fp32 on CPU{why}"


def find_resume_checkpoint(training_args):
    """--resume_from_checkpoint PATH|True, or the last checkpoint-* in output_dir when none is given."""
    flag = training_args.resume_from_checkpoint
    if flag in ("True", "true", True):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            raise UsageError(
                f"--resume_from_checkpoint True, but {training_args.output_dir} holds no complete checkpoint-*"
            )
        return last
    if flag not in (None, "", "False", "false"):
        return flag
    return last_complete_checkpoint(training_args.output_dir)


def last_complete_checkpoint(output_dir):
    """The newest checkpoint-* with its trainer_state.json; a run killed while saving leaves one without."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(
        (int(p.name.split("-")[1]), p) for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit()
    )
    for _, path in reversed(found):
        if (path / "trainer_state.json").exists():
            return str(path)
        logger.warning("skipping %s: it has no trainer_state.json (the run was stopped while saving it)", path)
    return None


class CpuFsdpMixin:
    """For a Trainer subclass: --fsdp on CPU ranks. accelerate turns FSDP on only from a GPU-type state; on CPU ranks
    (gloo) let it, the device stays CPU."""

    def create_accelerator_and_postprocess(self):
        from accelerate.state import DistributedType, PartialState

        state = PartialState._shared_state
        if self.args.fsdp and state.get("distributed_type") == DistributedType.MULTI_CPU:
            state["distributed_type"] = DistributedType.MULTI_GPU
        super().create_accelerator_and_postprocess()
