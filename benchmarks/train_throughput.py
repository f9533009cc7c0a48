"""Training throughput: train.py's padding-free collator against the original padded one, same model, same
micro-batches, interleaved in one run. Counts non-pad tokens per second of forward + backward (the optimizer step
is the same for both and left out).

    python -m benchmarks.train_throughput                      # embedded SmolLM2-135M, the project sample, CPU
    python -m benchmarks.train_throughput --data_path ../shared/realdata/alpaca_en_demo.json --lengthen 0
    python -m benchmarks.train_throughput --device cuda --dtype bf16 --attn flash_attention_2 --steps 10

The project sample is shorter than the real Alpaca data (mean 115 tokens, longest 279, against a mean of 120-200
and a tail to 512), so by default a seeded third of its rows get 1-4 other rows' outputs appended; the length
statistics are printed. Last line: the batch-16 ratio.
"""

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import transformers

import train  # noqa: E402
import utils  # noqa: E402

# bf16 dense peak, for MFU on GPU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=utils.EMBEDDED_MODEL, help="HF folder or id (default: the embedded SmolLM2-135M)")
    p.add_argument("--data_path", default=str(train.SAMPLE_TRAIN))
    p.add_argument(
        "--lengthen",
        type=float,
        default=None,
        help="share of rows given 1-4 other rows' outputs (default 0.33 for the project sample, else 0)",
    )
    p.add_argument("--batch_sizes", default="4,16")
    p.add_argument("--steps", type=int, default=2, help="timed micro-batches per batch size (one warm-up runs first)")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--also_rows",
        default="",
        help="also time ours with other row caps, comma-separated tokens; 0 = the whole micro-batch in one row "
        "(train.py splits rows at model_max_length, --max_length here)",
    )
    return p.parse_args()


def lengthened(rows, share, seed):
    rng = random.Random(seed)
    out = []
    for row in rows:
        row = dict(row)
        if rng.random() < share:
            extra = [rng.choice(rows)["output"] for _ in range(rng.randint(1, 4))]
            row["output"] = "\n\n".join([row["output"], *extra])
        out.append(row)
    return out


def step(model, batch, device):
    batch = {k: v.to(device) for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    path = utils.resolve_model_path(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=args.attn).to(
        args.device
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, model_max_length=args.max_length, padding_side="right")
    train.smart_tokenizer_and_embedding_resize(train.missing_special_tokens(tokenizer), tokenizer, model)
    model.train()

    rows = train.load_rows(args.data_path)
    share = (
        args.lengthen if args.lengthen is not None else (0.33 if Path(args.data_path) == train.SAMPLE_TRAIN else 0.0)
    )
    dataset = train.SupervisedDataset(args.data_path, tokenizer, lengthened(rows, share, args.seed))
    lengths = [len(x) for x in dataset.input_ids]
    print(
        f"{len(lengths)} rows, {share:.0%} lengthened: tokens mean {statistics.mean(lengths):.0f}, "
        f"median {statistics.median(lengths):.0f}, longest {max(lengths)}, "
        f"at the cap {sum(n >= args.max_length for n in lengths)}"
    )
    print(
        f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M) on {args.device}, {args.dtype}, "
        f"{args.attn}, {torch.get_num_threads()} threads"
    )

    original = train.DataCollatorForSupervisedDataset(tokenizer)
    ours = train.make_collator(tokenizer, model.config, args.max_length)
    variants = {"original": original, "ours": ours}
    for cap in (int(c) for c in args.also_rows.split(",") if c.strip()):
        variants[f"rows<={cap}" if cap else "one row"] = train.make_collator(tokenizer, model.config, cap or 10**9)
    n_params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    rng = random.Random(args.seed)
    results = {}
    for n, bs in enumerate(int(b) for b in args.batch_sizes.split(",")):
        warm = 1 if n == 0 else 0  # one warm-up micro-batch for the whole run, timed ones after it
        batches = [[dataset[i] for i in rng.sample(range(len(dataset)), bs)] for _ in range(args.steps + warm)]
        seconds = dict.fromkeys(variants, 0.0)
        per_batch = []  # original's time / ours, per micro-batch: robust to one stalled micro-batch on a shared CPU
        real = padded = 0
        for k, examples in enumerate(batches):
            order = list(variants.items())
            took_here = {}
            for name, collate in order if k % 2 else order[::-1]:  # interleaved, alternating who goes first
                batch = collate(examples)
                start = time.perf_counter()
                step(model, batch, args.device)
                took = took_here[name] = time.perf_counter() - start
                if k >= warm:  # the warm-up micro-batch runs both and counts for neither
                    seconds[name] += took
                print(
                    f"  batch {bs}, micro-batch {k + 1}/{len(batches)}{' (warm-up)' if k < warm else ''}, "
                    f"{name}: {took:.1f} s",
                    flush=True,
                )
            if k >= warm:
                per_batch.append(took_here["original"] / took_here["ours"])
                real += sum(len(x["input_ids"]) for x in examples)
                padded += original(examples)["input_ids"].numel()
        pad = 1 - real / padded
        speed = {name: real / s for name, s in seconds.items()}
        median = statistics.median(per_batch)
        results[bs] = (speed["ours"], speed["original"], speed["ours"] / speed["original"], median, 1 / (1 - pad))
        mfu = ""
        if peak:
            mfu = "  MFU ours {:.1%} original {:.1%}".format(
                *(6 * n_params * speed[n] / (peak * 1e12) for n in ("ours", "original"))
            )
        others = "".join(f", {name} {speed[name]:.0f} tok/s" for name in variants if name not in ("original", "ours"))
        print(
            f"batch {bs:>2}: pad {pad:.1%}, ours {speed['ours']:.0f} tok/s, original {speed['original']:.0f} tok/s, "
            f"ratio {speed['ours'] / speed['original']:.2f}x (median per micro-batch {median:.2f}x), "
            f"bound {1 / (1 - pad):.2f}x{others}{mfu}",
            flush=True,
        )

    print("\n| batch | ours tok/s | original tok/s | ratio | median ratio per micro-batch | bound 1/(1-pad) |")
    print("|---|---|---|---|---|---|")
    for bs, (a, b, r, med, bound) in results.items():
        print(f"| {bs} | {a:.0f} | {b:.0f} | {r:.2f}x | {med:.2f}x | {bound:.2f}x |")
    last = max(results)
    a, b, r, med, bound = results[last]
    print(
        f"batch {last}: padding-free {a:.0f} non-pad tok/s vs original {b:.0f} = {r:.2f}x "
        f"(median per micro-batch {med:.2f}x, bound {bound:.2f}x)"
    )


if __name__ == "__main__":
    main()
