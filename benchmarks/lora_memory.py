"""Memory and speed of full fine-tuning (the original recipe) against LoRA and QLoRA, same model, same micro-batches;
then the same comparison on paper for Llama-2-7B.

    python -m benchmarks.lora_memory                          # embedded SmolLM2-135M, the project sample, CPU
    python -m benchmarks.lora_memory --device cuda --steps 10 # peak torch.cuda.max_memory_allocated instead of RSS

Each mode runs in its own child process, built by train.load_model_and_tokenizer with train.py's flags (--use_peft,
--load_in_4bit), and takes AdamW steps (forward, backward, optimizer) on the same seeded micro-batches. On CPU the
peak is the child's own peak RSS from os.wait4, also shown above a child that only imports the same modules; on a GPU
it is torch.cuda.max_memory_allocated. Tokens/s counts real (non-pad) tokens of the timed steps after one warm-up.
Last line: the peak memory of LoRA and QLoRA as a share of full fine-tuning's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"full": [], "lora": ["--use_peft", "True"], "qlora": ["--use_peft", "True", "--load_in_4bit", "True"]}
GiB = 2**30

# Llama-2-7B's shape (its config.json) for the paper table; LoRA at train.py's defaults r=16 on all-linear.
LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32, vocab=32000 + 1)  # + the [PAD] row train.py adds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m", help="HF folder or id")
    p.add_argument("--modes", default="full,lora,qlora")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode, after one warm-up")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one mode and print JSON
    return p.parse_args(argv)


def run_mode(args):
    """In the child: train a few steps in one mode; print one JSON line."""
    import torch

    import train
    from alpaca_trainml.data import dataset
    from alpaca_trainml.data.collators import batch_to, make_collator
    from alpaca_trainml.training import segment_attention

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--model_name_or_path", args.model, "--output_dir", tmp, "--report_to", "none"]
        argv += ["--model_max_length", str(args.max_length), *MODES[args.child]]
        model_args, data_args, training_args, _ = train.parse_args(argv)
        model, tokenizer = train.load_model_and_tokenizer(model_args, training_args)
    if args.device == "cuda" and args.child != "qlora":  # QLoRA's base is already placed on the GPU as it loads
        model.to("cuda")
    rows = dataset.load_data(data_args, seed=0)
    data = dataset.make_supervised_data_module(tokenizer, data_args, 0, rows=rows)["train_dataset"]
    segment_attention.use_segments(model)  # train.py's layout: one row per micro-batch under sdpa
    collate = make_collator(tokenizer, model.config, args.max_length)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)  # the Trainer's adamw_torch: two fp32 states per parameter
    gen = torch.Generator().manual_seed(0)  # the same micro-batches in every mode
    order = torch.randperm(len(data), generator=gen).tolist()
    tokens, seconds = 0, 0.0
    model.train()
    for k in range(args.steps + 1):
        examples = [data[i] for i in order[k * args.batch_size : (k + 1) * args.batch_size]]
        batch = batch_to(collate(examples), args.device)
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if k:  # step 0 warms up
            seconds += time.perf_counter() - start
            tokens += sum(len(x["input_ids"]) for x in examples)
    result = dict(mode=args.child, trainable=sum(p.numel() for p in trainable))
    result["total"] = sum(p.numel() for p in model.parameters())
    result["tok_s"] = tokens / seconds
    if args.device == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result), flush=True)


def measure(args, mode):
    """Run one mode (or mode None: imports only) in a child: (its JSON result, its peak RSS in bytes)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if mode is None:
        cmd = [sys.executable, "-c", "import torch, transformers, peft, bitsandbytes, train, dataset, lora"]
    else:
        flags = ["--model", args.model, "--steps", str(args.steps), "--batch_size", str(args.batch_size)]
        flags += ["--max_length", str(args.max_length), "--device", args.device, "--child", mode]
        cmd = [sys.executable, "-m", "benchmarks.lora_memory", *flags]
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
    if child.returncode != 0:
        raise SystemExit(f"{mode or 'baseline'} failed with exit code {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1]) if mode else {}
    return result, usage.ru_maxrss * 1024  # Linux reports kilobytes


def paper_table(shape=LLAMA2_7B, r=16, budget=24 * GiB):
    """[(method, weights, gradients, optimizer states, total bytes)] for a Llama shape, activations left out.

    Full (mixed precision AdamW, as the ZeRO paper counts it): bf16 weights and gradients, fp32 master weights and
    two fp32 Adam moments = 2 + 2 + 12 bytes per parameter. LoRA: the frozen base in bf16 (2 bytes), adapters in
    fp32 with fp32 gradients and moments (4 + 4 + 8). QLoRA: linear weights in NF4 with double quantization,
    4 bits + 8-bit block scales per 64 weights + fp32 scale-of-scales per 256 blocks = 4.127 bits; embeddings and
    lm_head stay bf16."""
    h, i, n, v = shape["hidden"], shape["intermediate"], shape["layers"], shape["vocab"]
    linear = n * (4 * h * h + 3 * h * i)  # q k v o (no GQA in Llama-2-7B), gate up down
    embeddings = 2 * v * h  # input table and lm_head, untied
    norms = (2 * n + 1) * h
    total = linear + embeddings + norms
    adapter = n * r * (4 * (h + h) + 3 * (h + i))  # r * (in + out) per adapted linear layer
    nf4_bytes = (4 + 8 / 64 + 32 / (64 * 256)) / 8
    rows = [
        ("full fine-tuning", 2 * total, 2 * total, 12 * total, total),
        ("LoRA r=16", 2 * total + 4 * adapter, 4 * adapter, 8 * adapter, adapter),
        ("QLoRA r=16", nf4_bytes * linear + 2 * (embeddings + norms) + 4 * adapter, 4 * adapter, 8 * adapter, adapter),
    ]
    print(f"\nLlama-2-7B on paper ({total / 1e9:.2f}B parameters; activations not counted):")
    print("| method | trainable | weights | gradients | optimizer states | total | under 24 GiB? |")
    print("|---|---|---|---|---|---|---|")
    for name, w, g, o, trainable in rows:
        fits = "yes" if w + g + o < budget else "no"
        print(
            f"| {name} | {trainable / 1e6:,.0f}M | {w / GiB:.1f} GiB | {g / GiB:.2f} GiB | {o / GiB:.2f} GiB | "
            f"{(w + g + o) / GiB:.1f} GiB | {fits} |"
        )
    return rows


def main(args):
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    _, baseline = measure(args, None)
    results = {}
    for mode in modes:
        started = time.perf_counter()
        result, rss = measure(args, mode)
        peak = result.get("gpu_peak", rss)
        results[mode] = dict(result, peak=peak, rss=rss)
        print(f"{mode}: {json.dumps(results[mode])} ({time.perf_counter() - started:.0f} s)", flush=True)
    what = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print(f"\n{args.model} on {args.device}, batch {args.batch_size}, {args.steps} timed AdamW steps each")
    print(f"| mode | trainable params | {what} | above import baseline ({baseline / 2**20:.0f} MiB) | tokens/s |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        above = "" if args.device == "cuda" else f"{(r['rss'] - baseline) / 2**20:.0f} MiB"
        # of the full model's parameters: a 4-bit model's numel() counts two weights per packed byte
        share = f"{r['trainable']:,} ({r['trainable'] / results.get('full', r)['total']:.2%})"
        print(f"| {mode} | {share} | {r['peak'] / 2**20:.0f} MiB | {above} | {r['tok_s']:.0f} |")
    paper_table()
    if "full" in results:
        full = results["full"]["peak"]
        shares = ", ".join(f"{m} {r['peak'] / full:.2f}x" for m, r in results.items() if m != "full")
        print(f"lora_memory: {what} against full fine-tuning: {shares}")


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.child:
        run_mode(parsed)
    else:
        main(parsed)
