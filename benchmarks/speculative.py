"""Speculative decoding by prompt lookup (--speculative ngram) against plain decoding, batch 1, greedy, in one run on
one machine; then llama.cpp's own prompt-lookup decoding against its plain decoding on the same weights.

    python -m benchmarks.speculative                      # the embedded SmolLM2-135M, fp32, up to 128 tokens each
    python -m benchmarks.speculative --sets summarise --tokens 64 --no_llama_cpp

The prompts (benchmarks/grounded_prompts.json, written for this benchmark): 20 Alpaca-style rows with an input that
the answer draws on (correct, rewrite, extract, reformat, summarise a given text) and 8 articles to summarise. Each
prompt runs plain and speculative back to back, the order alternating, through the decoder core
(batch.DecodeBatch: what InstructModel.generate and serve.py's engine run). Effective tokens/s: tokens made over the
whole time, prefill included (the same prefill on both sides), per set; also after the first token (prefill left
out). Acceptance rate: drafted tokens the model kept / drafted tokens; tokens per step: tokens made / model steps.
The greedy texts of the two sides are compared. llama.cpp (.venv-peers, `make peers`): the f32 GGUF of the same
checkpoint, plain and with llama-cpp-python's LlamaPromptLookupDecoding (--lookup_ngram, --lookup_tokens), each in
its own process (benchmarks/peer_process.py: a crash is a FAILED row, not the end of the run).
Last line: the headline.
"""

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from alpaca_trainml import REPO_ROOT
from alpaca_trainml.generation.batch import DecodeBatch, Job
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.generation.speculative import Lookup
from alpaca_trainml.models import resolve_model_path
from benchmarks.decode_speed import gguf_file, llama_cpp, peer_status
from benchmarks.peer_process import PeerFailed

PROMPTS = Path(__file__).with_name("grounded_prompts.json")


def timed(model, ids, tokens, lookup):
    """One greedy answer: (Completion, seconds in all, seconds to the first token, drafted, accepted, steps, kept),
    kept: how many drafted tokens each verify step kept ([] for plain decoding; steps - 1 - len(kept) steps had no
    draft and decoded plainly)."""
    model.speculative = lookup
    batch, job = DecodeBatch(model), Job(ids, GenParams(max_tokens=tokens, temperature=0))
    kept, verify, rewind = [], batch.stepper.verify, batch.stepper.rewind
    width = []

    def counted_verify(tokens, counts=None):
        width.append(tokens.shape[1])
        return verify(tokens, counts)

    def counted_rewind(drop):
        kept.append(width[-1] - drop[0] - 1)  # a row of one: its positions, less those dropped, less its pending one
        return rewind(drop)

    batch.stepper.verify, batch.stepper.rewind = counted_verify, counted_rewind
    start = time.perf_counter()
    batch.admit([job])
    first, steps = time.perf_counter() - start, 1
    while batch.rows:
        batch.step()
        steps += 1
    seconds = time.perf_counter() - start
    model.speculative = None
    return job.future.result(), seconds, first, batch.drafted, batch.accepted, steps, kept


def run_set(model, rows, args, lookup):
    """{side: totals} for plain and speculative over the rows, each prompt's pair back to back."""
    sides = {"plain": None, "ngram": lookup}
    totals = {
        s: dict(tokens=0, seconds=0.0, decode_s=0.0, drafted=0, accepted=0, steps=0, texts=[], kept=[]) for s in sides
    }
    ratios = []
    for i, row in enumerate(rows):
        ids = model.encode_instruction(row["instruction"], row.get("input") or None)
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        got = {side: timed(model, ids, args.tokens, sides[side]) for side in order}
        for side, (done, seconds, first, drafted, accepted, steps, kept) in got.items():
            t = totals[side]
            t["tokens"] += done.completion_tokens
            t["seconds"] += seconds
            t["decode_s"] += seconds - first
            t["drafted"] += drafted
            t["accepted"] += accepted
            t["steps"] += steps
            t["kept"] += kept
            t["plain_steps"] = t.get("plain_steps", 0) + steps - 1 - len(kept)
            t["texts"].append(done.text)
        ratios.append(got["plain"][1] / got["ngram"][1])  # the same tokens on both sides (greedy)
    totals["ngram"]["median_ratio"] = statistics.median(ratios)
    return totals


def llama_cpp_set(gguf, model, rows, args):
    """(plain tokens/s, lookup tokens/s) of llama.cpp over the rows, prefill included; None where it failed."""
    runs = [[model.encode_instruction(r["instruction"], r.get("input") or None), args.tokens] for r in rows]
    rates = []
    for lookup in (None, [args.lookup_ngram, args.lookup_tokens]):
        try:
            out = llama_cpp(gguf, runs, torch.get_num_threads(), lookup)
        except PeerFailed as e:
            print(f"llama.cpp {'lookup' if lookup else 'plain'}: FAILED: {e}", flush=True)
            rates.append(None)
            continue
        rates.append(sum(n for n, _ in out) / sum(s for _, s in out))
    return rates


def report(name, totals):
    plain, spec = totals["plain"], totals["ngram"]
    same = sum(a == b for a, b in zip(plain["texts"], spec["texts"]))
    rate = {s: t["tokens"] / t["seconds"] for s, t in totals.items()}
    after = {s: (t["tokens"] - len(t["texts"])) / t["decode_s"] for s, t in totals.items()}
    accept = spec["accepted"] / max(spec["drafted"], 1)
    print(
        f"{name}: {len(spec['texts'])} prompts, {spec['tokens']} tokens; plain {rate['plain']:.1f} tok/s, "
        f"ngram {rate['ngram']:.1f} tok/s = {rate['ngram'] / rate['plain']:.2f}x (after the first token "
        f"{after['ngram'] / after['plain']:.2f}x; per prompt, median {spec['median_ratio']:.2f}x); acceptance "
        f"{accept:.2f} ({spec['accepted']}/{spec['drafted']}), {spec['tokens'] / spec['steps']:.2f} tokens per step "
        f"(plain {plain['tokens'] / plain['steps']:.2f}); greedy texts identical {same}/{len(spec['texts'])}",
        flush=True,
    )
    kept = spec["kept"]
    shares = ", ".join(f"{n}: {kept.count(n) / max(len(kept), 1):.2f}" for n in range(max(kept, default=0) + 1))
    print(
        f"{name}: {spec['plain_steps']} steps without a draft, {len(kept)} verify steps; drafted tokens kept per "
        f"verify step, share of those steps: {shares}",
        flush=True,
    )
    return rate["ngram"] / rate["plain"], accept, same, len(spec["texts"])


def main(args):
    checkpoint = resolve_model_path(args.model_name_or_path)
    model = InstructModel(checkpoint, dtype=args.dtype)
    sets = json.loads(PROMPTS.read_text())
    lengths = tuple(int(n) for n in args.lengths.split(",")) if args.lengths else (args.draft_tokens,)
    lookup = Lookup(args.draft_tokens, args.max_ngram, args.min_ngram, lengths=lengths)
    print(
        f"{model.name} ({args.dtype}), greedy, up to {args.tokens} tokens; {lookup}; {torch.get_num_threads()} threads"
    )
    timed(model, model.encode_instruction("Say hi."), 8, lookup)  # warm-up: the kernel, first-call allocations
    heads, theirs = [], []
    for name in args.sets.split(","):
        rows = sets[name][: args.prompts] if args.prompts else sets[name]
        head, their = compare(model, checkpoint, name, rows, args, lookup)
        heads.append(head)
        theirs += [their] if their else []
    vs = f"; llama.cpp's lookup over its plain: {', '.join(theirs)}" if theirs else ""
    print(f"speculative: ngram over plain decode, batch 1, {args.dtype}: {', '.join(heads)}{vs}")


def compare(model, checkpoint, name, rows, args, lookup):
    """One set: ours plain and ngram, then llama.cpp's plain and lookup (unless --no_llama_cpp or not installed);
    (our headline part, llama.cpp's or None)."""
    speedup, accept, same, n = report(name, run_set(model, rows, args, lookup))
    their = None
    if not args.no_llama_cpp and not peer_status():
        gguf = gguf_file(checkpoint, "f32", args.gguf_dir)
        plain, looked = llama_cpp_set(gguf, model, rows, args)
        if plain and looked:
            print(f"{name}: llama.cpp f32 plain {plain:.1f} tok/s, prompt lookup {looked:.1f} tok/s")
            their = f"{name} {looked / plain:.2f}x"
    return f"{name} {speedup:.2f}x (acceptance {accept:.2f}, identical {same}/{n})", their


def decode_speed_rows(model, checkpoint, tokens, prompts, gguf_dir):
    """benchmarks/decode_speed.py's speculative rows: the first `prompts` Alpaca rows with an input, ours plain and
    --speculative ngram (the defaults), llama.cpp plain and with its lookup (a crash is a FAILED line); the
    headline's part."""
    args = parse_args(["--tokens", str(tokens), "--gguf_dir", str(gguf_dir)])
    rows = json.loads(PROMPTS.read_text())["alpaca_input"][:prompts]
    head, their = compare(model, checkpoint, "alpaca_input", rows, args, Lookup())
    return f"speculative {head}" + (f", llama.cpp's lookup {their.split()[-1]} its plain" if their else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per answer at most (default 128)")
    p.add_argument("--sets", default="alpaca_input,summarise", help="prompt sets of grounded_prompts.json")
    p.add_argument("--prompts", type=int, default=0, help="the first N prompts of each set (default: all)")
    p.add_argument("--draft_tokens", type=int, default=Lookup.tokens, help="tokens drafted per step at most")
    p.add_argument("--max_ngram", type=int, default=Lookup.max_ngram)
    p.add_argument("--min_ngram", type=int, default=Lookup.min_ngram)
    p.add_argument(
        "--lengths",
        default=",".join(map(str, Lookup.lengths)),
        help="tokens drafted after a match of 1, 2, 3... tokens (default %(default)s; '': --draft_tokens for any)",
    )
    p.add_argument("--no_llama_cpp", action="store_true", help="skip llama.cpp's rows")
    p.add_argument("--lookup_ngram", type=int, default=2, help="llama.cpp's max_ngram_size (its default 2)")
    p.add_argument("--lookup_tokens", type=int, default=10, help="llama.cpp's num_pred_tokens (its default 10)")
    p.add_argument("--gguf_dir", default=str(REPO_ROOT / "out" / "bench"), help="where the GGUF file is made once")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
