"""End-to-end: the seed's launch commands run as printed (2 CPU ranks instead of 4 GPUs, a tiny Llama)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import ROOT, make_rows, subprocess_env

from alpaca_trainml import precision

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TIMEOUT = 1800  # s per launch; a first DeepSpeed run compiles its CPU ops (6 to 10 minutes on a slow 2-core machine)

# The trainML job command of the seed, verbatim but for --num_gpus 4 -> 2.
TRAINML_COMMAND = """deepspeed --num_gpus 2 train.py \\
--model_name_or_path "${TRAINML_CHECKPOINT_PATH}" \\
--data_path "${TRAINML_MODEL_PATH}/alpaca_data.json" \\
--bf16 True \\
--output_dir "${TRAINML_OUTPUT_PATH}" \\
--num_train_epochs 3 \\
--per_device_train_batch_size 16 \\
--per_device_eval_batch_size 16 \\
--gradient_accumulation_steps 2 \\
--gradient_checkpointing \\
--evaluation_strategy "no" \\
--save_strategy "steps" \\
--save_steps 2000 \\
--save_total_limit 1 \\
--learning_rate 2e-5 \\
--weight_decay 0. \\
--warmup_ratio 0.03 \\
--lr_scheduler_type "cosine" \\
--logging_steps 1 \\
--tf32 True \\
--deepspeed "${TRAINML_MODEL_PATH}/ds_config_zero2_offload.json" \\
--report_to none"""


def run(cmd, cwd, env, timeout=TIMEOUT):
    env = dict(env, PATH=f"{BIN}:{env['PATH']}")
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def job_dir(tmp_path, n_rows):
    """A checkout like trainML's TRAINML_MODEL_PATH: the repo's scripts and configs, plus alpaca_data.json."""
    d = tmp_path / "model"
    d.mkdir()
    for name in ["train.py", "utils.py", "ds_config_zero2_offload.json", "configs", "data"]:
        (d / name).symlink_to(ROOT / name)
    (d / "alpaca_data.json").write_text(json.dumps(make_rows(n_rows, seed=1)))
    return d


def assert_loads_and_changed(out_dir, initial_dir):
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    transformers.AutoTokenizer.from_pretrained(out_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(initial_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    t, b = tuned.state_dict()[name], base.state_dict()[name]
    assert t.shape == b.shape and not torch.equal(t, b), "training left the weights unchanged"


def logged_lrs(out_dir):
    history = json.loads((Path(out_dir) / "trainer_state.json").read_text())["log_history"]
    return [h["learning_rate"] for h in history if "learning_rate" in h]


def test_trainml_deepspeed_zero2_command_verbatim(tmp_path, tiny_llama_dir):
    # 768 rows / (16 per rank * 2 ranks * 2 accumulation) = 12 steps an epoch, 36 in all: warmup ceil(0.03*36) = 2
    model_path = job_dir(tmp_path, 768)
    out = tmp_path / "output"
    env = subprocess_env(TRAINML_CHECKPOINT_PATH=tiny_llama_dir, TRAINML_MODEL_PATH=model_path, TRAINML_OUTPUT_PATH=out)
    proc = run(TRAINML_COMMAND + " --model_max_length 256", cwd=model_path, env=env)
    # --bf16 True: bf16 (DeepSpeed's bf16 mode) on a CPU that computes it natively, else dropped, with a note either way
    bf16_note = "--bf16 trains in bf16 mixed precision" if precision.cpu_has_native_bf16() else "ignoring --bf16 True"
    assert bf16_note in proc.stdout + proc.stderr
    assert "2 rank(s), DistributedType.DEEPSPEED" in proc.stdout + proc.stderr
    assert (
        "padding-free batches: each micro-batch in one row, attention within each example" in proc.stdout + proc.stderr
    )  # the default, under ZeRO-2 and gradient checkpointing
    assert_loads_and_changed(out, tiny_llama_dir)
    lrs = logged_lrs(out)
    assert len(lrs) == 36, lrs
    peak = max(lrs)
    assert lrs[0] < peak and lrs.index(peak) == 1  # 2 warmup steps, then cosine
    assert peak == pytest.approx(2e-5) and lrs[-1] < 0.1 * peak, lrs  # not the flat 2e-5 of a WarmupLR block
    assert (out / "loss.png").stat().st_size > 0


def test_original_readme_fsdp_command(tmp_path, tiny_llama_dir, free_port):
    model_path = job_dir(tmp_path, 128)
    out = tmp_path / "fsdp_out"
    cmd = f"""torchrun --nproc_per_node=2 --master_port={free_port} train.py \\
    --model_name_or_path {tiny_llama_dir} --data_path ./alpaca_data.json --bf16 True --output_dir {out} \\
    --num_train_epochs 3 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 \\
    --gradient_accumulation_steps 8 --evaluation_strategy "no" --save_strategy "steps" --save_steps 2000 \\
    --save_total_limit 1 --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type "cosine" \\
    --logging_steps 1 --fsdp "full_shard auto_wrap" --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' \\
    --tf32 True --model_max_length 256"""
    proc = run(cmd, cwd=model_path, env=subprocess_env())
    assert "2 rank(s), DistributedType.FSDP" in proc.stderr  # sharded, not silently plain DDP
    assert_loads_and_changed(out, tiny_llama_dir)
    assert len(logged_lrs(out)) == 6  # 128 rows / (4 * 2 ranks * 8) = 2 steps an epoch, 3 epochs


def test_zero3_offload_saves_weights_that_load(tmp_path, tiny_llama_dir, free_port):
    model_path = job_dir(tmp_path, 64)
    out = tmp_path / "z3_out"
    cmd = f"""torchrun --nproc_per_node=2 --master_port={free_port} train.py \\
      --model_name_or_path {tiny_llama_dir} --data_path ./alpaca_data.json --bf16 True --output_dir {out} \\
      --num_train_epochs 1 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 \\
      --gradient_accumulation_steps 2 --evaluation_strategy "no" --save_strategy "steps" --save_steps 2000 \\
      --save_total_limit 1 --learning_rate 1e-3 --weight_decay 0. --warmup_ratio 0.03 \\
      --deepspeed "./configs/default_offload_opt_param.json" --tf32 True --model_max_length 256 --report_to none"""
    proc = run(cmd, cwd=model_path, env=subprocess_env())
    assert "2 rank(s), DistributedType.DEEPSPEED" in proc.stderr
    assert_loads_and_changed(out, tiny_llama_dir)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_llama_dir, data_file):
    data = data_file(make_rows(64, seed=2))
    out = tmp_path / "resume_out"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--model_name_or_path",
        str(tiny_llama_dir),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--model_max_length",
        "256",
        "--learning_rate",
        "1e-3",
    ]
    env = subprocess_env()
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + TIMEOUT
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert first.poll() is None, "the first run ended before writing checkpoint-2"
            assert time.time() < deadline, "no checkpoint-2 in time"
            time.sleep(0.2)
    finally:
        first.kill()
        first.wait()
    assert not (out / "trainer_state.json").exists(), "the first run finished before it was killed"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stderr and "checkpoint-" in proc.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 32  # 64 rows / 4 per step * 2 epochs
    steps_logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps_logged[-1] == 32 and min(steps_logged) > 0


def test_two_torchrun_nodes_on_one_machine_train_and_exit_together(tmp_path, tiny_llama_dir, free_port):
    """Multi-node as the README gives it: two torchrun "nodes" (one CPU rank each) meet at --master_addr and run the
    original README's FSDP command; both exit 0, together, with no abort at exit."""
    model_path = job_dir(tmp_path, 64)
    out = tmp_path / "multinode_out"
    flags = f"""--model_name_or_path {tiny_llama_dir} --data_path ./alpaca_data.json --bf16 True --output_dir {out} \\
    --num_train_epochs 2 --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --evaluation_strategy "no" \\
    --save_strategy "steps" --save_steps 2000 --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 \\
    --lr_scheduler_type "cosine" --logging_steps 1 --fsdp "full_shard auto_wrap" \\
    --fsdp_transformer_layer_cls_to_wrap 'LlamaDecoderLayer' --tf32 True --model_max_length 256"""
    env = dict(subprocess_env(), PATH=f"{BIN}:{subprocess_env()['PATH']}")
    nodes, logs, ended = [], [], {}
    for rank in (0, 1):
        cmd = f"""torchrun --nnodes 2 --node_rank {rank} --nproc_per_node 1 --master_addr 127.0.0.1 \\
        --master_port {free_port} train.py {flags}"""
        logs.append(open(tmp_path / f"node{rank}.log", "w"))  # files, not pipes: a full pipe would stall a node
        nodes.append(
            subprocess.Popen(
                ["bash", "-c", cmd], cwd=model_path, env=env, stdout=logs[-1], stderr=logs[-1], start_new_session=True
            )
        )
    try:
        deadline = time.time() + TIMEOUT
        while len(ended) < 2 and time.time() < deadline:
            ended.update(
                {rank: time.time() for rank, node in enumerate(nodes) if node.poll() is not None and rank not in ended}
            )
            time.sleep(0.5)
    finally:
        for node, log in zip(nodes, logs):
            if node.poll() is None:  # timed out: stop torchrun and its rank too, not just bash
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
            log.close()
    text = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert len(ended) == 2, f"a node was still running after {TIMEOUT} s: {ended}"
    assert [node.returncode for node in nodes] == [0, 0], "\n---\n".join(t[-4000:] for t in text)
    assert not any("terminate called" in t for t in text)  # an abort at exit, seen in 1 of 5 runs before close_ranks
    # torchrun's exit barrier waits up to 300 s for a node that did not finish cleanly: the nodes end together
    assert abs(ended[0] - ended[1]) < 60, ended
    assert "2 rank(s), DistributedType.FSDP" in text[0]
    assert_loads_and_changed(out, tiny_llama_dir)
    assert len(logged_lrs(out)) == 8  # 64 rows / (4 per rank * 2 nodes * 2 accumulation) = 4 steps an epoch, 2 epochs
