"""The ROUGE-L dedup filter: the original's approach (rouge_score, a new Pool per candidate) against ours (rapidfuzz
LCS on token ids), in the same run, on the same candidates, checking that both keep exactly the same instructions.

    python -m benchmarks.dedup                              # 1,000 synthetic candidates, then a 52,000-instruction pass
    python -m benchmarks.dedup --data_path ../shared/realdata/alpaca_en_demo.json --num_cpus 2
    python -m benchmarks.dedup --full_pass 0                # skip the 52K pass

The pool starts as the project's 175 seed instructions, as in generate_instruction. Last line: the speed-up at 1,000.
"""

import argparse
import json
import os
import random
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer, tokenizers
from tqdm import tqdm

from alpaca_trainml.self_instruct import prompting as self_instruct
from alpaca_trainml.self_instruct import rouge_dedup

VERBS = (
    "Explain Describe Summarize Compare List Suggest Rewrite Classify Outline Evaluate Name Estimate Propose Rank"
).split()
FUNCTION_WORDS = "the a of to in for and with how what is this that on by from your my an".split()


def synthetic_instructions(n, seed=0, vocab_size=5000):
    """n instructions of 6-20 words: a verb, then function words (40%) and made-up content words (60%) from a
    vocabulary of vocab_size, so most pairs share a little, as real instructions do. About one in ten is a one-word
    edit of an earlier one, which the filter must drop."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))) for _ in range(vocab_size)})
    out = []
    while len(out) < n:
        if out and rng.random() < 0.1:
            words = rng.choice(out).split()
            words[rng.randrange(1, len(words))] = rng.choice(vocab)
        else:
            words = [rng.choice(VERBS)] + [
                rng.choice(FUNCTION_WORDS) if rng.random() < 0.4 else rng.choice(vocab)
                for _ in range(rng.randint(5, 19))
            ]
        out.append(" ".join(words) + rng.choice(".?"))
    return out


def original_filter(pool, candidates, num_cpus):
    """The original loop: tokenize each candidate, score it against the pool with a new Pool, keep if best F <= 0.7."""
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)  # what RougeScorer(["rougeL"], use_stemmer=False) uses
    pool = list(pool)
    pool_tokens = [tokenizer.tokenize(t) for t in pool]
    kept = []
    for cand in candidates:
        new_tokens = tokenizer.tokenize(cand)
        with Pool(num_cpus) as p:  # the original opened one per candidate
            scores = [s.fmeasure for s in p.map(partial(rouge_scorer._score_lcs, new_tokens), pool_tokens)]
        if max(scores) > 0.7:
            continue
        kept.append((cand, {pool[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]}, float(np.mean(scores))))
        pool.append(cand)
        pool_tokens.append(new_tokens)
    return kept


def our_filter(pool, candidates, num_cpus, batch=16, progress=False):
    """generate_instruction's dedup, fed one response's worth (16 tasks, 4..19) at a time."""
    deduper, kept = rouge_dedup.RougeLDeduper(pool, workers=num_cpus), []
    starts = range(0, len(candidates), batch)
    for start in tqdm(starts, desc="full pass", unit="batch", disable=not progress):
        chunk = candidates[start : start + batch]
        for cand, (keep, scores) in zip(chunk, deduper.filter_batch(chunk)):
            if keep:
                fields = rouge_dedup.similarity_fields(scores, deduper.instructions)
                kept.append((cand, fields["most_similar_instructions"], fields["avg_similarity_score"]))
    return kept


def same_decisions(a, b):
    return len(a) == len(b) and all(
        x[0] == y[0]
        and list(x[1]) == list(y[1])
        and np.allclose(list(x[1].values()), list(y[1].values()), rtol=0, atol=1e-9)
        and abs(x[2] - y[2]) <= 1e-9
        for x, y in zip(a, b)
    )


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process and its reaped children, e.g. Pool workers)."""
    cpu = lambda: sum(os.times()[:4])  # noqa: E731  user + system, self + children
    start, start_cpu = time.perf_counter(), cpu()
    out = fn(*args)
    return out, time.perf_counter() - start, cpu() - start_cpu


def main(args):
    seeds = [t["instruction"] for t in self_instruct.load_seed_tasks(self_instruct.SEED_TASKS_PATH)]
    if args.data_path:
        candidates = [r["instruction"] for r in json.loads(Path(args.data_path).read_text())][: args.num_candidates]
    else:
        candidates = synthetic_instructions(args.num_candidates)
    print(
        f"{len(candidates)} candidates ({args.data_path or 'synthetic'}), "
        f"pool starts with {len(seeds)} seed instructions, "
        f"num_cpus {args.num_cpus}",
        flush=True,
    )
    ours, t_ours, cpu_ours = timed(our_filter, seeds, candidates, args.num_cpus)
    print(f"ours: {t_ours:.3f} s wall, {cpu_ours:.3f} s CPU, kept {len(ours)}", flush=True)
    original, t_orig, cpu_orig = timed(original_filter, seeds, candidates, args.num_cpus)
    print(
        f"original (rouge_score, Pool({args.num_cpus}) per candidate): {t_orig:.2f} s wall, {cpu_orig:.2f} s CPU, "
        f"kept {len(original)}",
        flush=True,
    )
    if not same_decisions(original, ours):
        raise SystemExit("the two filters disagree: a bug in the fast dedup")
    print("decisions, most_similar_instructions and avg_similarity_score: identical (scores within 1e-9)")
    if args.full_pass:
        pass_candidates = synthetic_instructions(args.full_pass, seed=1)
        kept, t_pass, cpu_pass = timed(partial(our_filter, progress=True), seeds, pass_candidates, args.num_cpus)
        print(
            f"full_pass_{args.full_pass}_seconds: {t_pass:.1f} wall, {cpu_pass:.1f} CPU "
            f"(kept {len(kept)}, pool {len(seeds) + len(kept)})",
            flush=True,
        )
    print(f"CPU-time ratio at {len(candidates)}: {cpu_orig / cpu_ours:.1f}")
    print(f"dedup_speedup_at_{len(candidates)}: {t_orig / t_ours:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_path", help="an Alpaca JSON file whose instructions are the candidates (default: synthetic)"
    )
    parser.add_argument("--num_candidates", type=int, default=1000)
    parser.add_argument(
        "--num_cpus", type=int, default=os.cpu_count(), help="Pool size for the original, threads for ours"
    )
    parser.add_argument(
        "--full_pass", type=int, default=52000, help="instructions in the timed full pass of ours (0: skip)"
    )
    main(parser.parse_args())
