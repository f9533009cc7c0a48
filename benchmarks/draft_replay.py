"""Draft settings for prompt-lookup speculation compared by replaying plain greedy answers: no timing noise.

    python -m benchmarks.draft_replay                  # the embedded SmolLM2-135M, 64 greedy tokens per prompt
    python -m benchmarks.draft_replay --cost 1,1.08,1.15,1.2,1.24,1.31,1.38,1.45,1.52

Under greedy decoding a drafted token is kept exactly when it is the token plain decoding makes there
(speculative.accept_greedy), so one plain run of each prompt of benchmarks/grounded_prompts.json tells what any draft
setting would keep: each setting is replayed step by step over those answers, batch 1, through speculative.draft
with its Lookup (the lone row's rules of row_draft). Per set: tokens per step (the first token, from prefill, counts
as one step), acceptance, steps without a draft, the first drafted token kept by the length of the match, and the
speedup after the first token that --cost gives: the cost of a step of 1, 2, 3... positions in plain steps (default:
a verify step's cost measured by benchmarks/verify_cost.py on a 2-core Xeon with AVX-512, one thread, loaded, k = 1,
2, 3, 5, 8, and in between). Also a setting that grows each row's draft after a full acceptance and shrinks it after a
rejection (`adaptive`). Last line: the headline.
"""

import argparse
import json

from alpaca_trainml.generation.batch import DecodeBatch, Job
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.generation.speculative import Lookup, draft
from alpaca_trainml.models import resolve_model_path
from benchmarks.speculative import PROMPTS

SETTINGS = {
    "up to 8 from 3..1 (first)": Lookup(tokens=8, min_ngram=1, lengths=(8,)),
    "up to 4 from 3..2 (before)": Lookup(tokens=4, min_ngram=2, lengths=(4,)),
    "up to 8 from 3..2": Lookup(tokens=8, min_ngram=2, lengths=(8,)),
    "1/4/8 by match (default)": Lookup(),
    "adaptive 2..12 from 3..2": Lookup(tokens=12, min_ngram=2, lengths=(12,)),  # capped per row: Adaptive
}


def plain_answers(model, rows, tokens):
    """[(prompt ids, answer ids)]: each prompt's greedy answer as plain decoding makes it, end-of-text included."""
    out = []
    for r in rows:
        ids = model.encode_instruction(r["instruction"], r.get("input") or None)
        batch, job = DecodeBatch(model), Job(ids, GenParams(max_tokens=tokens, temperature=0))
        batch.admit([job])
        row = batch.rows[0]
        while batch.rows:
            batch.step()
        made = job.future.result().completion_tokens
        out.append((ids, (row.ids + list(model.eos_ids)[:1])[:made]))  # made counts end-of-text, ids do not
    return out


def match_length(context, lookup):
    """The length of the longest match draft() would use (0: none)."""
    for n in range(lookup.max_ngram, lookup.min_ngram - 1, -1):
        if draft(context, 1, n, n):
            return n
    return 0


def step_cost(cost, positions):
    """A step of `positions` positions in plain steps: --cost's entry, or past its end, its last step's increase on."""
    if positions <= len(cost):
        return cost[positions - 1]
    slope = cost[-1] - cost[-2] if len(cost) > 1 else 0.0
    return cost[-1] + (positions - len(cost)) * slope


def replay(answers, lookup, tokens, cost, adaptive=False):
    """Totals of a batch-1 replay of the answers under the setting."""
    t = dict(cost=0.0, steps=0, made=0, drafted=0, kept=0, nodraft=0, first={})
    for prompt, answer in answers:
        n, cap = 1, 4  # the first token comes from prefill; cap: the adaptive setting's length for this row
        t["steps"] += 1
        while n < len(answer):
            room = min(lookup.tokens, cap if adaptive else lookup.tokens, tokens - n - 1)
            context = prompt + answer[:n]
            d = draft(context, room, lookup.max_ngram, lookup.min_ngram, lookup.lengths) if room > 0 else []
            kept = 0
            while kept < len(d) and n + kept < len(answer) and d[kept] == answer[n + kept]:
                kept += 1
            if d:
                seen = t["first"].setdefault(match_length(context, lookup), [0, 0])
                seen[0], seen[1] = seen[0] + 1, seen[1] + (kept > 0)
                cap = min(cap + 2, 12) if kept == len(d) else max(2, kept + 1)
            t["cost"] += step_cost(cost, len(d) + 1)
            t["steps"] += 1
            t["drafted"], t["kept"], t["nodraft"] = t["drafted"] + len(d), t["kept"] + kept, t["nodraft"] + (not d)
            n += kept + 1
        t["made"] += len(answer)
    return t


def main(args):
    model = InstructModel(resolve_model_path(args.model_name_or_path), dtype="float32")
    cost = [float(c) for c in args.cost.split(",")]
    sets = {k: v for k, v in json.loads(PROMPTS.read_text()).items() if k != "about"}
    answers = {name: plain_answers(model, rows, args.tokens) for name, rows in sets.items()}
    print(f"{args.tokens} greedy tokens per prompt; cost of a step of 1, 2, ... positions in plain steps: {cost}")
    best = {}
    for label, lookup in SETTINGS.items():
        for name, got in answers.items():
            t = replay(got, lookup, args.tokens, cost, adaptive=label.startswith("adaptive"))
            speedup = (t["made"] - len(got)) / t["cost"]
            first = ", ".join(f"{n}: {k / s:.2f}" for n, (s, k) in sorted(t["first"].items()))
            print(
                f"{label:28s} {name:13s} {t['made'] / t['steps']:.2f} tokens/step, acceptance "
                f"{t['kept'] / max(t['drafted'], 1):.2f}, {t['nodraft']} steps without a draft, first token kept "
                f"by match length {{{first}}}; modelled {speedup:.2f}x after the first token"
            )
            best.setdefault(label, []).append(f"{name} {speedup:.2f}x")
    print(
        "draft_replay: modelled speedup after the first token: "
        + "; ".join(f"{label}: {', '.join(v)}" for label, v in best.items())
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per answer at most (default 64)")
    p.add_argument("--cost", default="1,1.08,1.15,1.2,1.24,1.31,1.38,1.45,1.52", help="a step of 1, 2... positions")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
