"""Training throughput. Three cases, each compared with the original approach in the same run:

- padding_free: train.py's padding-free collator against the original padded one, same model, same micro-batches,
  interleaved; non-pad tokens per second of forward + backward (the optimizer step is the same for both).
- small: the same comparison on a 2-layer Llama (hidden 512) with an 800-token BPE vocabulary trained here, where
  the logits are cheap and any per-token overhead of the padding-free path shows.
- precision: fp32 against bf16 autocast (what --bf16 True does on a CPU with AVX512-BF16/AMX), full AdamW steps on
  the same micro-batches from the same weights, interleaved; tokens/s and the loss after the same steps.

    python -m benchmarks.train_throughput                      # all three: embedded SmolLM2-135M, project sample, CPU
    python -m benchmarks.train_throughput --case small --steps 12
    python -m benchmarks.train_throughput --case precision --steps 6
    python -m benchmarks.train_throughput --data_path ../shared/realdata/alpaca_en_demo.json --lengthen 0
    python -m benchmarks.train_throughput --device cuda --dtype bf16 --attn flash_attention_2 --steps 10

The project sample is shorter than the real Alpaca data (mean 115 tokens, longest 279, against a mean of 120-200
and a tail to 512), so by default a seeded third of its rows get 1-4 other rows' outputs appended; the length
statistics are printed. Last line: the batch-16 padding-free ratios and the bf16 speed-up.
"""

import argparse
import copy
import random
import statistics
import time
from pathlib import Path

import torch
import transformers

import train
from alpaca_trainml import models
from alpaca_trainml.data import collators, dataset, special_tokens
from alpaca_trainml.data.special_tokens import missing_special_tokens, smart_tokenizer_and_embedding_resize
from alpaca_trainml.training import segment_attention

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense peak, for MFU on GPU
CASES = ("padding_free", "small", "precision")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", choices=("all", *CASES))
    p.add_argument(
        "--model", default=models.EMBEDDED_MODEL, help="HF folder or id (default: the embedded SmolLM2-135M)"
    )
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
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights' type for the padding-free cases")
    p.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--also_rows",
        default="",
        help="also time the earlier padding-free layout (rows up to this many tokens, block-diagonal mask), "
        "comma-separated; 0 = the whole micro-batch in one masked row (train.py now lays it in one row and attends "
        "within each example)",
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


def load_dataset(args, tokenizer):
    rows = dataset.load_rows(args.data_path)
    share = (
        args.lengthen if args.lengthen is not None else (0.33 if Path(args.data_path) == train.SAMPLE_TRAIN else 0.0)
    )
    data = dataset.SupervisedDataset(args.data_path, tokenizer, lengthened(rows, share, args.seed))
    lengths = [len(x) for x in data.input_ids]
    print(
        f"{len(lengths)} rows, {share:.0%} lengthened: tokens mean {statistics.mean(lengths):.0f}, "
        f"median {statistics.median(lengths):.0f}, longest {max(lengths)}, "
        f"at the cap {sum(n >= args.max_length for n in lengths)}"
    )
    return data


def embedded_model(args, dtype=torch.float32):
    path = models.resolve_model_path(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=args.attn)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, model_max_length=args.max_length, padding_side="right")
    smart_tokenizer_and_embedding_resize(missing_special_tokens(tokenizer), tokenizer, model)
    return model.to(args.device), tokenizer


def small_model(args, dtype=torch.float32):
    """A 2-layer Llama, hidden 512, with an 800-token byte-level BPE vocabulary trained on the data's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = dataset.load_rows(args.data_path)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator((text for r in rows for text in (r["instruction"], r["input"], r["output"])), trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="</s>", model_max_length=args.max_length, padding_side="right"
    )
    tokenizer.add_special_tokens(missing_special_tokens(tokenizer))  # the model is built at the final size
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = args.attn
    return transformers.LlamaForCausalLM(config).to(device=args.device, dtype=dtype), tokenizer


def step(model, batch, device):
    batch = collators.batch_to(batch, device)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare_collators(name, model, tokenizer, data, args):
    """Padded vs padding-free on the same micro-batches, interleaved: {batch size: (ours, original, ratio, median
    ratio, bound)} in non-pad tokens/s."""
    print(
        f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {args.device}, {args.dtype}, "
        f"{args.attn}, {torch.get_num_threads()} threads"
    )
    original = collators.DataCollatorForSupervisedDataset(tokenizer)
    mask_dtype = torch.bool if args.attn == "sdpa" else torch.float32
    segment_attention.use_segments(model)  # as train.py does: under sdpa, "ours" is one row with attention per example
    variants = {"original": original, "ours": collators.make_collator(tokenizer, model.config, args.max_length)}
    for cap in (int(c) for c in args.also_rows.split(",") if c.strip()):  # the earlier layout: masked rows up to cap
        name = f"mask rows<={cap}" if cap else "mask one row"
        variants[name] = collators.DataCollatorPaddingFree(tokenizer, cap or 10**9, mask_dtype=mask_dtype)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(args.seed)
    model.train()
    results = {}
    for n, bs in enumerate(int(b) for b in args.batch_sizes.split(",")):
        warm = 1 if n == 0 else 0  # one warm-up micro-batch for the whole run, timed ones after it
        batches = [[data[i] for i in rng.sample(range(len(data)), bs)] for _ in range(args.steps + warm)]
        seconds = dict.fromkeys(variants, 0.0)
        per_batch = []  # original's time / ours, per micro-batch: robust to one stalled micro-batch on a shared CPU
        real = padded = 0
        for k, examples in enumerate(batches):
            order = list(variants.items())
            took_here = {}
            for variant, collate in order if k % 2 else order[::-1]:  # interleaved, alternating who goes first
                start = time.perf_counter()  # the collator's time counts: it runs on the training loop's thread
                step(model, collate(examples), args.device)
                took_here[variant] = time.perf_counter() - start
                if k >= warm:  # the warm-up micro-batch runs both and counts for neither
                    seconds[variant] += took_here[variant]
            print(
                f"  batch {bs}, micro-batch {k + 1}/{len(batches)}{' (warm-up)' if k < warm else ''}: "
                + ", ".join(f"{v} {t:.2f} s" for v, t in took_here.items()),
                flush=True,
            )
            if k >= warm:
                per_batch.append(took_here["original"] / took_here["ours"])
                real += sum(len(x["input_ids"]) for x in examples)
                padded += original(examples)["input_ids"].numel()
        pad = 1 - real / padded
        speed = {v: real / s for v, s in seconds.items()}
        results[bs] = (
            speed["ours"],
            speed["original"],
            speed["ours"] / speed["original"],
            statistics.median(per_batch),
        )
        results[bs] += (1 / (1 - pad),)
        mfu = ""
        if peak:
            mfu = "  MFU ours {:.1%} original {:.1%}".format(
                *(6 * n_params * speed[v] / (peak * 1e12) for v in ("ours", "original"))
            )
        others = "".join(f", {v} {speed[v]:.0f} tok/s" for v in variants if v not in ("original", "ours"))
        print(
            f"batch {bs:>2}: pad {pad:.1%}, ours {speed['ours']:.0f} tok/s, original {speed['original']:.0f} tok/s, "
            f"ratio {results[bs][2]:.2f}x (median per micro-batch {results[bs][3]:.2f}x), "
            f"bound {results[bs][4]:.2f}x{others}{mfu}",
            flush=True,
        )
    print(f"\n{name}\n| batch | ours tok/s | original tok/s | ratio | median ratio per micro-batch | bound 1/(1-pad) |")
    print("|---|---|---|---|---|---|")
    for bs, (a, b, r, med, bound) in results.items():
        print(f"| {bs} | {a:.0f} | {b:.0f} | {r:.2f}x | {med:.2f}x | {bound:.2f}x |")
    return results


def compare_precision(model, tokenizer, data, args, batch_size=4, max_length=256):
    """fp32 against bf16 autocast: AdamW steps from the same weights on the same micro-batches (train.py's padding-free
    layout at make demo's batch and length), interleaved. Returns {precision: (tokens/s, last loss)}."""
    device_type = torch.device(args.device).type
    segment_attention.use_segments(model)
    collate = collators.make_collator(tokenizer, model.config, max_length)
    rng = random.Random(args.seed)
    short = [i for i in range(len(data)) if len(data[i]["input_ids"]) <= max_length]
    batches = [collate([data[i] for i in rng.sample(short, batch_size)]) for _ in range(args.steps + 1)]
    runs = {}
    for precision in ("fp32", "bf16"):
        copy_ = copy.deepcopy(model).train()
        runs[precision] = (copy_, torch.optim.AdamW(copy_.parameters(), lr=3e-5, fused=False))
    seconds, losses = dict.fromkeys(runs, 0.0), {p: [] for p in runs}
    for k, batch in enumerate(batches):
        batch = collators.batch_to(batch, args.device)
        for precision, (copy_, optimizer) in runs.items() if k % 2 else reversed(runs.items()):
            start = time.perf_counter()
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = copy_(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            took = time.perf_counter() - start
            if k:  # the first step warms up both
                seconds[precision] += took
                losses[precision].append(loss.item())
            print(f"  step {k + 1}/{len(batches)}, {precision}: {took:.1f} s, loss {loss.item():.4f}", flush=True)
    tokens = sum(int(b["labels"].ne(special_tokens.IGNORE_INDEX).sum()) for b in batches[1:])  # trained tokens
    result = {p: (tokens / seconds[p], losses[p][-1]) for p in runs}
    print(f"\nprecision, {args.steps} AdamW steps at batch {batch_size} x up to {max_length} tokens on {args.device}")
    print("| precision | trained tok/s | loss after the same steps |\n|---|---|---|")
    for p, (speed, loss) in result.items():
        print(f"| {p} | {speed:.1f} | {loss:.4f} |")
    return result


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = CASES if args.case == "all" else (args.case,)
    weights = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    headline = []
    if "small" in cases:
        model, tokenizer = small_model(args, weights)
        small = compare_collators("small model", model, tokenizer, load_dataset(args, tokenizer), args)
        bs = max(small)
        headline.append(f"small model batch {bs} {small[bs][2]:.2f}x of bound {small[bs][4]:.2f}x")
    if "padding_free" in cases or "precision" in cases:
        model, tokenizer = embedded_model(args, weights)
        data = load_dataset(args, tokenizer)
        if "padding_free" in cases:
            ours = compare_collators(args.model, model, tokenizer, data, args)
            bs = max(ours)
            headline.append(f"{args.model} batch {bs} {ours[bs][2]:.2f}x of bound {ours[bs][4]:.2f}x")
        if "precision" in cases:
            speed = compare_precision(model.float(), tokenizer, data, args)
            headline.append(f"bf16/fp32 {speed['bf16'][0] / speed['fp32'][0]:.2f}x")
    print("train_throughput: " + "; ".join(headline))


if __name__ == "__main__":
    main()
