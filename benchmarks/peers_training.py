"""Training beside TRL's SFTTrainer, on the same work, in one run: tokens/s, peak RSS and held-out loss of each side.

    python -m benchmarks.peers_training --data_path ../shared/realdata/alpaca_en_demo.json     # full and LoRA, fp32
    python -m benchmarks.peers_training --configs lora --steps 10 --trl_modes padded

The same work for both: the embedded SmolLM2-135M, the same Alpaca rows in the same order (a seeded shuffle, then
read sequentially by both Trainers), the same Alpaca prompt and loss on the response tokens only (TRL is handed the
very input_ids and labels train.py builds, so the supervised tokens are equal by construction, and counted on both
sides as the batches are made), the same max length, batch, accumulation, LR, cosine schedule, seed and number of
optimizer steps. LoRA: r=16, alpha 32, no dropout (so both sides are deterministic), all linear layers, the same
seeded initialisation. Ours runs train.py's own train() (padding-free, one row, attention per example); TRL runs in
.venv-peers (`make peers`) through benchmarks/peers_trl.py, in each mode of --trl_modes, without gradient
checkpointing (its default is on, which is slower). Each run is its own process: its peak RSS is the process's.
The held-out loss of every trained model is computed afterwards by the same code (token-weighted mean over
--eval_rows rows never trained on). bf16 runs only where the CPU has native bf16 (AVX512-BF16 or AMX); elsewhere it
is emulated and would measure the emulation.

Each run is its own process with a time limit (--timeout): a TRL run that crashes or hangs prints FAILED with the
signal and its log's last line, and the other runs go on.

Last line: ours' tokens/s over TRL's fastest exact mode, per configuration.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from alpaca_trainml import REPO_ROOT
from alpaca_trainml.models import EMBEDDED_MODEL
from benchmarks.peer_process import PeerFailed, run_logged

PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=str(REPO_ROOT / "data" / "sample_train.json"), help="Alpaca rows (JSON)")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--configs", default="full,lora", help="comma list of full, lora")
    p.add_argument("--dtypes", default="auto", help="auto (fp32, and bf16 where the CPU has it natively), or fp32,bf16")
    p.add_argument("--trl_modes", default="padded,padding_free", help="TRL collators to time: padded, padding_free")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (one epoch over exactly this many batches)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5, help="full fine-tuning")
    p.add_argument("--lora_lr", type=float, default=2e-4)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--eval_rows", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work_dir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--peers_python", default=str(PEERS_PYTHON))
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides (default: inherited)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one training run may take (default 3600)")
    p.add_argument("--resume", action="store_true", help="with --work_dir: keep the runs an earlier call finished")
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)  # internal: run ours' side only, here
    return p.parse_args(argv)


def native_bf16():
    """True when the CPU does bf16 matrix math in hardware (Linux flags), so a bf16 run measures bf16, not emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run_measured(what, cmd, log_path, timeout, env=None):
    """Run cmd in its own process; (seconds, peak RSS in GiB of that process alone). Output goes to log_path. A run
    that crashes or passes `timeout` seconds raises PeerFailed (the signal and the log's last line)."""
    return run_logged(what, cmd, log_path, timeout, cwd=REPO_ROOT, env=env)


# ---------------------------------------------------------------------------------------------------------------
# The same work for both sides
def prepare(args, work):
    """Write work/train.json + eval.json (Alpaca rows), train_tokens.jsonl (train.py's input_ids and labels) and
    job.json. Returns (job, train examples)."""
    import torch

    from alpaca_trainml import jsonio, models
    from alpaca_trainml.data.dataset import SupervisedDataset, load_rows
    from alpaca_trainml.data.special_tokens import missing_special_tokens

    rows = load_rows(args.data_path)
    n_train = args.steps * args.batch_size * args.grad_accum
    if len(rows) < n_train + args.eval_rows:
        raise SystemExit(f"peers_training: {args.data_path} has {len(rows)} rows; need {n_train + args.eval_rows}")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    eval_rows, train_rows = [rows[i] for i in order[: args.eval_rows]], [rows[i] for i in order[args.eval_rows :]]
    jsonio.jdump(train_rows[:n_train], work / "train.json")
    jsonio.jdump(eval_rows, work / "eval.json")
    model_path = str(models.embedded_model_path()) if args.model == EMBEDDED_MODEL else args.model
    tokenizer = tokenizer_for(model_path, args.max_length)
    if missing_special_tokens(tokenizer):  # train.py would grow the vocabulary: TRL's model would differ
        raise SystemExit(f"peers_training: {args.model} lacks special tokens train.py adds; pick a model that has them")
    data = SupervisedDataset(str(work / "train.json"), tokenizer, train_rows[:n_train])
    examples = [dict(input_ids=i.tolist(), labels=lab.tolist()) for i, lab in zip(data.input_ids, data.labels)]
    with open(work / "train_tokens.jsonl", "w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in examples)
    job = dict(
        model=model_path,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        seed=args.seed,
        max_length=args.max_length,
        dataloader_num_workers=0,
        lora=LORA,
        configs=dict(full=dict(learning_rate=args.lr), lora=dict(learning_rate=args.lora_lr)),
    )
    (work / "job.json").write_text(json.dumps(job, indent=1))
    return job, examples


def tokenizer_for(model_path, max_length):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_path, model_max_length=max_length, padding_side="right")


def supervised_per_step(counts, grad_accum):
    """Micro-batch counts summed into optimizer steps."""
    return [sum(counts[i : i + grad_accum]) for i in range(0, len(counts), grad_accum)]


def prefix_mismatches(rows, tokenizer):
    """Rows whose tokenized prompt is not a prefix of the tokenized prompt+output+EOS. There TRL's own tokenization
    (completion mask from the common prefix) and train.py's (mask len(prompt) tokens) label different positions."""
    from alpaca_trainml.data.alpaca_labels import build_example_texts

    sources, targets = build_example_texts(rows, tokenizer.eos_token)
    src = tokenizer(sources)["input_ids"]
    full = tokenizer([s + t for s, t in zip(sources, targets)])["input_ids"]
    return sum(f[: len(s)] != s for s, f in zip(src, full))


# ---------------------------------------------------------------------------------------------------------------
# Ours: train.py's train(), in its own process
def ours_argv(job, config, dtype, work, out):
    argv = [
        *("--model_name_or_path", job["model"], "--data_path", str(Path(work) / "train.json")),
        *("--output_dir", str(Path(out) / "model"), "--per_device_train_batch_size", str(job["batch_size"])),
        *("--gradient_accumulation_steps", str(job["grad_accum"])),
        *("--learning_rate", str(job["configs"][config]["learning_rate"])),
        *("--lr_scheduler_type", job["lr_scheduler_type"], "--warmup_steps", str(job["warmup_steps"])),
        *("--num_train_epochs", "1", "--seed", str(job["seed"]), "--model_max_length", str(job["max_length"])),
        *("--train_sampling_strategy", "sequential", "--logging_steps", "1", "--save_strategy", "no"),
        *("--report_to", "none", "--disable_tqdm", "True", "--bf16", str(dtype == "bf16")),
    ]
    if config == "lora":
        lora = job["lora"]
        argv += ["--use_peft", "True", "--lora_r", str(lora["r"]), "--lora_alpha", str(lora["lora_alpha"])]
        argv += ["--lora_dropout", str(lora["lora_dropout"]), "--lora_target_modules", lora["target_modules"]]
    return argv


def ours_worker(work, out, config, dtype):
    """train.py's train() as it is, with one probe: its collator counts the supervised tokens it hands out."""
    from alpaca_trainml.training import sft

    job = json.loads((Path(work) / "job.json").read_text())
    counts = []
    make_collator = sft.make_collator

    def counting_collator(*a, **kw):  # the benchmark's probe; train() itself is unchanged
        collate = make_collator(*a, **kw)

        def collate_and_count(instances):
            batch = collate(instances)
            counts.append(int((batch["labels"] != -100).sum()))
            return batch

        collate_and_count.attention = collate.attention
        return collate_and_count

    sft.make_collator = counting_collator
    trainer = sft.train(ours_argv(job, config, dtype, work, out))
    history = trainer.state.log_history
    result = dict(
        side="ours",
        train_runtime=next(h["train_runtime"] for h in history if "train_runtime" in h),
        micro_batch_supervised=counts,
        losses=[h["loss"] for h in history if "loss" in h],
        optim=str(trainer.args.optim),
    )
    (Path(out) / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# Held-out loss of a trained model, the same code for every side
def heldout_loss(job, model_dir, config, eval_path, batch_size=8):
    """Mean cross-entropy per supervised token (train.py's labels) over the eval rows."""
    import torch
    import transformers

    from alpaca_trainml.data.dataset import SupervisedDataset

    tokenizer = tokenizer_for(job["model"], job["max_length"])
    data = SupervisedDataset(str(eval_path), tokenizer, json.loads(Path(eval_path).read_text()))
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    if model_dir is not None and config == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir)
    elif model_dir is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            ids, labels = data.input_ids[start : start + batch_size], data.labels[start : start + batch_size]
            width = max(len(x) for x in ids)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])  # pad id = EOS here: by length
            batch_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=job["pad_token_id"])
            batch_labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)
            logits = model(input_ids=batch_ids, attention_mask=mask).logits[:, :-1].float()
            target = batch_labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
            total, count = total + float(loss), count + int((target != -100).sum())
    return total / count


# ---------------------------------------------------------------------------------------------------------------
# The runs, the checks and the table
def run_side(args, work, side, config, dtype):
    """Train one side in its own process and evaluate what it saved: a dict of its figures."""
    out = work / "runs" / f"{config}-{dtype}-{side}"
    out.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, "-m", "benchmarks.peers_training", "--worker_out", str(out), "--configs", config]
    if side == "ours":
        cmd = [*me, "--work_dir", str(work), "--dtypes", dtype]
    else:
        cmd = [args.peers_python, "-m", "benchmarks.peers_trl", "--work", str(work), "--out", str(out)]
        cmd += ["--mode", side.removeprefix("trl-"), "--config", config] + (["--bf16"] if dtype == "bf16" else [])
    if (out / "measured.json").exists() and args.resume:  # a finished run of an interrupted benchmark
        return json.loads((out / "measured.json").read_text())
    try:
        seconds, rss = run_measured(
            f"{side} {config}-{dtype}", cmd, out / "log.txt", args.timeout, threads_env(args.threads)
        )
    except PeerFailed as e:
        if side == "ours":
            raise SystemExit(f"peers_training: {e}") from None  # ours failing is our bug, not a finding
        print(f"  failed: {e}", flush=True)  # a peer's crash costs its row only
        return dict(side=side, failed=str(e))
    result = json.loads((out / "result.json").read_text())
    job = json.loads((work / "job.json").read_text())
    result.update(process_s=seconds, peak_rss_gib=rss)
    result["eval_loss"] = heldout_loss(job, str(out / "model"), config, work / "eval.json")
    result["per_step"] = supervised_per_step(result["micro_batch_supervised"], job["grad_accum"])
    (out / "measured.json").write_text(json.dumps(result))
    return result


def threads_env(threads):
    """The environment for a run: with --threads, both sides use that many intra-op threads."""
    return None if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def leak_report(args, work):
    """TRL's padding-free batch against each example alone, per attention; {impl: max |logit diff|} and versions."""
    out = work / "leak"
    if (out / "leak.json").exists() and args.resume:
        return json.loads((out / "leak.json").read_text())
    cmd = [args.peers_python, "-m", "benchmarks.peers_trl", "--work", str(work), "--out", str(out), "--leak_check"]
    try:
        run_measured("TRL leak check", cmd, work / "leak_log.txt", args.timeout)
    except PeerFailed as e:
        print(f"failed: {e}; TRL's padding-free mode is counted as not exact", flush=True)
        return None
    return json.loads((out / "leak.json").read_text())


def print_config(name, results, total_tokens, baseline_loss):
    for r in results:
        if "failed" in r:
            print(f"  {r['side']}: FAILED: {r['failed']}")
    results = [r for r in results if "failed" not in r]
    print(f"\n{name}: {total_tokens} tokens in {len(results[0]['per_step'])} optimizer steps")
    print(f"  supervised tokens per step: ours {results[0]['per_step']}")
    for r in results[1:]:
        same = "equal" if r["per_step"] == results[0]["per_step"] else f"DIFFERENT {r['per_step']}"
        print(f"  supervised tokens per step: {r['side']} {same}")
    print(f"  {'side':18} {'train s':>8} {'tokens/s':>9} {'peak RSS':>9} {'eval loss':>10} {'vs ours':>8}  optim")
    ours = results[0]
    for r in results:
        r["tokens_per_s"] = total_tokens / r["train_runtime"]
        diff = 100 * (r["eval_loss"] / ours["eval_loss"] - 1)
        print(
            f"  {r['side']:18} {r['train_runtime']:8.1f} {r['tokens_per_s']:9.0f} {r['peak_rss_gib']:7.2f} G "
            f"{r['eval_loss']:10.4f} {diff:+7.2f}%  {r['optim']}"
        )
    print(f"  (eval loss of the untrained model: {baseline_loss:.4f})")


def main(argv=None):
    args = parse_args(argv)
    if args.worker_out:  # one side's training run, in its own process
        return ours_worker(args.work_dir, args.worker_out, args.configs, args.dtypes)
    if not Path(args.peers_python).exists():
        raise SystemExit(f"peers_training: no {args.peers_python}; run `make peers` first (TRL in .venv-peers)")
    dtypes = args.dtypes.split(",") if args.dtypes != "auto" else ["fp32"] + (["bf16"] if native_bf16() else [])
    if args.dtypes == "auto" and "bf16" not in dtypes:
        print("bf16 skipped: this CPU has no native bf16 (no avx512_bf16/amx_bf16); it would time the emulation")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        job, examples = prepare(args, work)
        total_tokens = sum(len(e["input_ids"]) for e in examples)
        tokenizer = tokenizer_for(job["model"], job["max_length"])
        rows = json.loads((work / "train.json").read_text())
        print(f"{len(rows)} train rows, {args.eval_rows} held out, from {args.data_path}; TRL gets train.py's tokens")
        print(f"  rows where TRL's own text tokenization would label differently: {prefix_mismatches(rows, tokenizer)}")
        leak = leak_report(args, work)
        # SFTTrainer trains with use_cache=False: that is the case that decides whether its padding-free mode is exact
        training = [v for k, v in leak["max_logit_diff"].items() if k.endswith("use_cache=False")] if leak else [1]
        exact = {m for m in args.trl_modes.split(",") if m == "padded" or max(training) < 1e-3}
        if leak:
            print(
                f"TRL {leak['trl']}, transformers {leak['transformers']} (.venv-peers); padding-free batch vs alone, "
                f"max |logit diff|: {leak['max_logit_diff']} -> exact TRL modes: {sorted(exact)}"
            )
        baseline = heldout_loss(job, None, "full", work / "eval.json")
        ratios = {}
        for config in args.configs.split(","):
            for dtype in dtypes:
                sides = ["ours"] + [f"trl-{m}" for m in args.trl_modes.split(",")]
                results = [run_side(args, work, side, config, dtype) for side in sides]
                print_config(f"{config}-{dtype}", results, total_tokens, baseline)
                ratios[f"{config}-{dtype}"] = summarize(results, exact)
    print("peers_training: ours/TRL tokens/s " + " ".join(f"{k} {v}" for k, v in ratios.items()))


def summarize(results, exact):
    """'1.62' (ours over TRL's fastest exact mode), with the fastest mode that leaks in brackets when there is one."""
    ours, trl = results[0], [r for r in results[1:] if "failed" not in r]
    if not any(r["side"].removeprefix("trl-") in exact for r in trl):
        return "n/a (TRL failed)"
    best_exact = max((r for r in trl if r["side"].removeprefix("trl-") in exact), key=lambda r: r["tokens_per_s"])
    line = f"{ours['tokens_per_s'] / best_exact['tokens_per_s']:.2f}"
    leaky = [r for r in trl if r["side"].removeprefix("trl-") not in exact]
    rss = ours["peak_rss_gib"] / best_exact["peak_rss_gib"]
    loss = 100 * (ours["eval_loss"] / best_exact["eval_loss"] - 1)
    print(f"  ours / {best_exact['side']}: tokens/s x{line}, peak RSS x{rss:.2f}, eval loss {loss:+.2f}%")
    if leaky:
        fastest = max(leaky, key=lambda r: r["tokens_per_s"])
        line += f" ({ours['tokens_per_s'] / fastest['tokens_per_s']:.2f} vs {fastest['side']}, which leaks)"
    return line


if __name__ == "__main__":
    main()
