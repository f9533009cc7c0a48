"""Structured output (response_format) on a CPU: the grammar libraries, then the cost in tokens/s on our decode path.

    python -m benchmarks.structured_output                    # the embedded SmolLM2-135M, fp32, batch 4
    python -m benchmarks.structured_output --no_outlines --repeats 1

1. Libraries, on the model's tokenizer (49152 tokens for SmolLM2): for each schema below, the time to compile it and
   the time to compute one row's mask of allowed tokens at each step along a valid document (median and max), for
   llguidance (what serve.py uses, generation/structured.py) and outlines-core (`pip install outlines-core`; skipped
   when absent), which compiles the schema into a token automaton up front.
2. Decoding, through the decoder core (batch.DecodeBatch, as serve.py's engine runs it): the same chat prompts,
   greedy, a batch of --batch rows, once free and once under the record schema, back to back with the order
   alternating, --repeats times. Each row makes at most as many tokens as its JSON answer takes (a first run finds
   them), so that both sides run about the same steps. Tokens/s: completion tokens over the wall time, prefill
   included; ms per decode step, prefill left out. The constrained side's time includes its masks; the time spent in
   them is also given on its own. Every constrained answer is checked with jsonschema.
Last line: the headline.
"""

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace

import torch

from alpaca_trainml.generation import batch as batch_module
from alpaca_trainml.generation.batch import DecodeBatch, Job
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.generation.structured import Grammars
from alpaca_trainml.models import resolve_model_path

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
TASK = {
    "type": "object",
    "properties": {
        "instruction": {"type": "string", "maxLength": 200},
        "input": {"type": "string"},
        "output": {"type": "string"},
    },
    "required": ["instruction", "output"],
}
JUDGE = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "reason": {"type": "string", "minLength": 1, "maxLength": 500},
        "winner": {"anyOf": [{"enum": ["A", "B"]}, {"type": "null"}]},
    },
    "required": ["score", "reason"],
}
SCHEMAS = {  # name: (schema, a document that follows it)
    "record": (RECORD, {"name": "Ada Lovelace", "age": 36, "hobbies": ["mathematics", "poetry", "horses"]}),
    "judge": (JUDGE, {"score": 7, "reason": "Output (a) answers the question; (b) repeats it.", "winner": "A"}),
    "tasks": (
        {"type": "object", "properties": {"tasks": {"type": "array", "items": TASK, "maxItems": 20}}},
        {
            "tasks": [
                {"instruction": "Name a colour.", "output": "Blue"},
                {"instruction": "Add 2 and 3.", "output": "5"},
            ]
        },
    ),
    "json_object": ({"type": "object"}, {"a": [1, 2.5, None], "b": {"c": "d"}}),
}
PROMPTS = [
    "Describe a fictional person as JSON with the fields name, age and hobbies.",
    "Invent a character for a story. Give their name, age and up to three hobbies.",
    "Who is a famous scientist? Answer with their name, age at death and hobbies.",
    "Make up a neighbour: name, age, hobbies.",
    "Write a short profile of a chef: name, age and hobbies.",
    "Give me a person record for a test database.",
    "Create a user profile with name, age and hobbies for a demo.",
    "Tell me about a pianist: name, age, hobbies.",
]


def outlines_vocabulary(tokenizer):
    """outlines-core's Vocabulary of a byte-level BPE tokenizer: each token's bytes, as outlines' own adapter does."""
    import outlines_core
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    tokens = {}
    for tid in range(len(tokenizer)):
        if tid != tokenizer.eos_token_id:
            piece = tokenizer.convert_ids_to_tokens(tid)
            raw = bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece) else piece.encode()
            tokens.setdefault(raw, []).append(tid)
    return outlines_core.Vocabulary(tokenizer.eos_token_id, tokens)


def mask_times(start, step, fill, ids, vocab):
    """Seconds to compute each step's mask along ids: fill(state, words) writes it, step(state, id) advances."""
    state, words, times = start(), torch.zeros((vocab + 31) // 32, dtype=torch.int32), []
    for i in ids:
        t = time.perf_counter()
        fill(state, words)
        times.append(time.perf_counter() - t)
        step(state, i)
    return times


def libraries(model, args):
    """Print compile and mask times per schema and library; {library: (compile s, mask s per step)} over schemas."""
    vocab_size = len(model.tokenizer)
    grammars = Grammars(model.tokenizer, model.eos_ids)
    t = time.perf_counter()
    grammars.tokenizer()
    print(f"llguidance: the tokenizer read in {time.perf_counter() - t:.2f} s (once per model)")
    try:
        import outlines_core

        vocab = None if args.no_outlines else outlines_vocabulary(model.tokenizer)
    except ImportError:
        vocab = None
    out = {"llguidance": ([], []), "outlines-core": ([], [])}
    for name, (schema, document) in SCHEMAS.items():
        ids = model.tokenizer(json.dumps(document), add_special_tokens=False)["input_ids"]
        t = time.perf_counter()
        matchers = grammars.compile(schema)
        compiled = time.perf_counter() - t
        times = mask_times(matchers, lambda m, i: m.consume(i), lambda m, w: m.fill_mask(w), ids, vocab_size)
        out["llguidance"][0].append(compiled)
        out["llguidance"][1].extend(times)
        line = f"{name}: llguidance compile {compiled * 1e3:.1f} ms, mask {ms(times)}"
        if vocab is not None:
            t = time.perf_counter()
            regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema))
            index = outlines_core.Index(regex, vocab)
            compiled = time.perf_counter() - t
            times = mask_times(
                lambda index=index: outlines_core.Guide(index),
                lambda g, i: g.advance(i),
                lambda g, w: g.write_mask_into(w.data_ptr(), w.numel(), 4),
                ids,
                vocab_size,
            )
            out["outlines-core"][0].append(compiled)
            out["outlines-core"][1].extend(times)
            line += f"; outlines-core compile {compiled:.2f} s, mask {ms(times)}"
        print(f"{line} ({len(ids)} tokens)", flush=True)
    return out


def ms(times):
    return f"median {statistics.median(times) * 1e6:.0f} us, max {max(times) * 1e3:.2f} ms"


def decode(model, jobs):
    """Run the jobs to the end in one batch: (completions, seconds, seconds of the prefill, decode steps)."""
    batch = DecodeBatch(model)
    start = time.perf_counter()
    batch.admit(jobs)
    prefill, steps = time.perf_counter() - start, 0
    while batch.rows:
        batch.step()
        steps += 1
    return [j.future.result() for j in jobs], time.perf_counter() - start, prefill, steps


def decoding(model, args):
    import jsonschema

    grammars = Grammars(model.tokenizer, model.eos_ids)
    matchers = grammars.compile(RECORD)
    prompts = [model.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[: args.batch]]
    params = GenParams(max_tokens=args.tokens, temperature=0)
    masking = []  # seconds in structured.constrain, constrained side
    real = batch_module.constrain

    def timed_constrain(rows, logits, eos_ids):
        t = time.perf_counter()
        out = real(rows, logits, eos_ids)
        masking.append(time.perf_counter() - t)
        return out

    # warm-up, and each JSON answer's length: both sides then make that many tokens per row (the free side fewer
    # where it ends first), so that their steps compare like for like
    first, _, _, _ = decode(model, [Job(p, params, grammar=matchers()) for p in prompts])
    lengths = [c.completion_tokens for c in first]
    totals = {s: dict(tokens=0, seconds=0.0, decode_s=0.0, steps=0) for s in ("free", "json")}
    ratios = []
    for r in range(args.repeats):
        rates = {}
        for side in ("free", "json") if r % 2 == 0 else ("json", "free"):
            jobs = [
                Job(p, replace(params, max_tokens=n), grammar=matchers() if side == "json" else None)
                for p, n in zip(prompts, lengths)
            ]
            batch_module.constrain = timed_constrain if side == "json" else real
            try:
                done, seconds, prefill, steps = decode(model, jobs)
            finally:
                batch_module.constrain = real
            if side == "json":
                for c in done:
                    if c.finish_reason == "stop":
                        jsonschema.validate(json.loads(c.text), RECORD)
                cut = sum(c.finish_reason == "length" for c in done)
            tokens = sum(c.completion_tokens for c in done)
            totals[side]["tokens"] += tokens
            totals[side]["seconds"] += seconds
            totals[side]["steps"] += steps
            totals[side]["decode_s"] += seconds - prefill
            rates[side] = (seconds - prefill) / steps
            print(
                f"repeat {r + 1} {side}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s; "
                f"{rates[side] * 1e3:.1f} ms per decode step",
                flush=True,
            )
        ratios.append(rates["json"] / rates["free"])
    step_s = {s: t["decode_s"] / t["steps"] for s, t in totals.items()}
    mask_s = statistics.median(masking)
    print(
        f"json answers cut by max_tokens in the last repeat: {cut}/{len(prompts)}; the mask for {args.batch} rows: "
        f"median {mask_s * 1e3:.2f} ms per step; a decode step {step_s['json'] * 1e3:.1f} ms constrained, "
        f"{step_s['free'] * 1e3:.1f} ms free"
    )
    rate = {s: t["tokens"] / t["seconds"] for s, t in totals.items()}
    return rate, statistics.median(ratios), mask_s, step_s


def main(args):
    model = InstructModel(resolve_model_path(args.model_name_or_path), dtype=args.dtype)
    print(f"{model.name} ({args.dtype}), {torch.get_num_threads()} threads, batch {args.batch}, greedy")
    libs = libraries(model, args)
    rate, ratio, mask_s, step_s = decoding(model, args)
    llg_compile, llg_masks = libs["llguidance"]
    oc = libs["outlines-core"]
    vs = f", outlines-core up to {max(oc[0]):.1f} s" if oc[0] else ""
    print(
        f"structured output: batch {args.batch}, decode step {step_s['json'] * 1e3:.1f} ms under json_schema vs "
        f"{step_s['free'] * 1e3:.1f} ms free (median ratio {ratio:.2f}; {rate['json']:.1f} vs {rate['free']:.1f} "
        f"tok/s with prefill); llguidance mask median {statistics.median(llg_masks) * 1e6:.0f} us per row, the "
        f"batch's {mask_s * 1e3:.2f} ms; compile up to {max(llg_compile) * 1e3:.0f} ms{vs}"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=4, help="rows decoded together (at most 8)")
    p.add_argument("--tokens", type=int, default=96, help="max_tokens of each answer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_outlines", action="store_true", help="skip outlines-core (its compile takes up to a minute)")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
