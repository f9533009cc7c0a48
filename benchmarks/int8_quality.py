"""int8 weights (--dtype int8) against fp32 on the same checkpoint, and llama.cpp's q8_0 against its f32, in one run:
greedy agreement, held-out perplexity, and decode speed in back-to-back rounds, for each of the int8 products asked for
(--kernels: the default, 16-bit input rows, and the 8-bit ones as llama.cpp's q8_0 x q8_0). benchmarks/decode_speed.py
runs speed pairs too (its int8 rows).

    OMP_NUM_THREADS=1 python -m benchmarks.int8_quality   # the embedded SmolLM2-135M; 8 prompts x 64 greedy tokens

Agreement: for each of the 8 instructions of benchmarks/serve_throughput.py, how many of the fp32 model's greedy tokens
the 8-bit model reproduces before the first difference (a run that ends at the same end-of-text counts whole); ours
int8 against ours fp32, llama.cpp q8_0 against llama.cpp f32 (both GGUF files export_gguf.py makes from the checkpoint;
llama.cpp f32 gives our fp32 tokens, tests/test_export_gguf.py). Perplexity on held-out text (the repository's
README.md and docs/*.md, as benchmarks/gguf_quants.py reads them): over --chunks chunks of 512 tokens through the
prefill path (dequantized int8 weights, fp32 activations), and over the first --decode_chunks token by token through
the decode kernel (its int8 products), each against fp32 on the same tokens. Speed: --rounds rounds of 2 x --tokens
greedy tokens, each round our fp32, our int8 on each kernel and llama.cpp's q8_0 (run without AMX buffers,
llama_cpp_peer.py) back to back; the medians of the ratios within a round. Last line: the headline.
"""

import argparse
import functools
import math
import os
import statistics

import torch
import torch.nn.functional as F

from alpaca_trainml import REPO_ROOT
from alpaca_trainml.cli import UsageError
from alpaca_trainml.generation import int8 as int8_weights
from alpaca_trainml.generation.llama_step import LlamaStep
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.models import resolve_model_path
from benchmarks.gguf_quants import held_out_text
from benchmarks.peer_process import PeerFailed
from benchmarks.serve_throughput import INSTRUCTIONS

N_CTX = 512  # tokens per perplexity chunk


def common_prefix(reference, other):
    n = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        n += 1
    return len(reference) if n == len(reference) == len(other) else n


def greedy(step, ids, n, eos):
    """Our greedy tokens through the model step (as serve.py decodes them), up to n or an end-of-text token."""
    step.keep([])
    logits, out = step.prefill([ids]), []
    while len(out) < n:
        out.append(int(logits.argmax(-1)))
        if out[-1] in eos:
            break
        logits = step.decode(torch.tensor(out[-1:]))
    return out


@torch.inference_mode()
def perplexity_prefill(model, chunks):
    nll = scored = 0
    for ids in chunks:
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        nll += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        scored += len(ids) - 1
    return math.exp(nll / scored)


def perplexity_decode(step, chunks):
    """Every token after each chunk's first scored from decode() steps (the kernel's path), fed the text's tokens."""
    nll = scored = 0
    for ids in chunks:
        step.keep([])
        logits = step.prefill([ids[:1]])
        for i, t in enumerate(ids[1:]):
            nll += F.cross_entropy(logits.float(), torch.tensor([t])).item()
            if i + 2 < len(ids):
                logits = step.decode(torch.tensor([t]))
        scored += len(ids) - 1
    return math.exp(nll / scored)


def speed_pairs(fp32, int8, ids, tokens, rounds):
    """[int8 / fp32 decode rate] over `rounds` back-to-back pairs (the order alternating), ours through generate()."""
    print(f"speed pairs: {tokens} greedy tokens each, {torch.get_num_threads()} thread(s)", flush=True)
    from benchmarks.decode_speed import decode_rate, ours  # here: decode_speed imports this module

    ratios = []
    for i in range(rounds):
        order = [fp32, int8] if i % 2 == 0 else [int8, fp32]
        rate = {id(m): decode_rate(ours(m, ids), tokens)[0] for m in order}
        ratios.append(rate[id(int8)] / rate[id(fp32)])
        print(
            f"int8 against fp32, pair {i + 1}: {rate[id(int8)]:.1f} / {rate[id(fp32)]:.1f} tok/s ({ratios[-1]:.2f}x)",
            flush=True,
        )
    return ratios


def llama_cpp_agreement(checkpoint, prompts, tokens, gguf_dir):
    """Tokens of llama.cpp's f32 greedy output its q8_0 reproduces, per prompt; None when llama.cpp cannot run."""
    from benchmarks.decode_speed import gguf_file, llama_cpp, peer_status

    if peer_status():
        print(f"llama.cpp: not run: {peer_status()}")
        return None
    runs, threads = [[ids, tokens] for ids in prompts], torch.get_num_threads()
    try:
        made = {t: llama_cpp(gguf_file(checkpoint, t, gguf_dir), runs, threads, tokens=True) for t in ("f32", "q8_0")}
    except PeerFailed as e:
        print(f"llama.cpp: failed: {e}")
        return None
    return [common_prefix(a[2], b[2]) for a, b in zip(made["f32"], made["q8_0"])], [len(a[2]) for a in made["f32"]]


def speed_rounds(fp32, int8, kernels, ids, tokens, rounds, gguf=None):
    """[{name: tokens/s}] per round: each round decodes `tokens` greedy tokens with our fp32, our int8 on each of
    `kernels` and llama.cpp's q8_0 (the GGUF file `gguf`; None: left out), back to back, the order reversed every other
    round, so that ratios within a round are not decided by this machine's drift between rounds."""
    from benchmarks.decode_speed import decode_rate, llama_cpp_rate, ours

    def int8_rate(isa):
        use_kernel(isa)
        return decode_rate(ours(int8, ids), tokens)[0]

    runs = {"fp32": lambda: decode_rate(ours(fp32, ids), tokens)[0]}
    runs.update({isa: functools.partial(int8_rate, isa) for isa in kernels})
    if gguf:
        runs["llama.cpp q8_0"] = lambda: llama_cpp_rate(gguf, ids, tokens, torch.get_num_threads())[0]
    print(f"speed: {rounds} rounds of {tokens} greedy tokens each, {torch.get_num_threads()} thread(s)", flush=True)
    out = []
    for i in range(rounds):
        got = {}
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            try:
                got[name] = runs[name]()
            except PeerFailed as e:
                print(f"round {i + 1}, {name}: failed: {e}", flush=True)
        print(f"round {i + 1}: " + ", ".join(f"{n} {got[n]:.1f}" for n in runs if n in got) + " tok/s", flush=True)
        out.append(got)
    return out


def ratio(rounds, a, b):
    """The median over rounds of a's rate / b's, in the rounds that have both; nan where none has."""
    both = [r[a] / r[b] for r in rounds if a in r and b in r]
    return statistics.median(both) if both else float("nan")


def use_kernel(name):
    """Set the int8 products to ALPACA_INT8_KERNEL=name (the steps already built follow it); the name in use, or None
    where this CPU lacks it."""
    os.environ[int8_weights.ISA_ENV] = name
    try:
        int8_weights.kernel()
    except UsageError as e:
        print(f"int8 kernel {name}: not run: {e}")
        return None
    return int8_weights.instructions()


def main(args):
    checkpoint = resolve_model_path(args.model_name_or_path)
    fp32, int8 = InstructModel(checkpoint, dtype="float32"), InstructModel(checkpoint, dtype="int8")
    steps = LlamaStep(fp32.model), LlamaStep(int8.model)
    prompts = [fp32.encode_instruction(p) for p in INSTRUCTIONS]
    eos = set(fp32.eos_ids)
    reference = [greedy(steps[0], ids, args.tokens, eos) for ids in prompts]
    total = sum(len(r) for r in reference)
    text = fp32.tokenizer(held_out_text(None), add_special_tokens=False)["input_ids"]
    chunks = [text[i : i + N_CTX] for i in range(0, args.chunks * N_CTX, N_CTX) if i + N_CTX <= len(text)]
    ppl = [perplexity_prefill(m.model, chunks) for m in (fp32, int8)]
    print(f"perplexity, {len(chunks)} chunks of {N_CTX} (prefill path): fp32 {ppl[0]:.3f}, int8 {ppl[1]:.3f}")
    dec_fp32 = perplexity_decode(steps[0], chunks[: args.decode_chunks])
    found = {}
    for name in args.kernels.split(","):  # each: agreement and the decode path's perplexity
        isa = use_kernel(name)
        if isa is None or isa in found:
            continue
        agree = [common_prefix(a, greedy(steps[1], ids, args.tokens, eos)) for a, ids in zip(reference, prompts)]
        dec = perplexity_decode(steps[1], chunks[: args.decode_chunks])
        found[isa] = sum(agree), 100 * (dec / dec_fp32 - 1)
        print(
            f"int8 kernel {isa}: follows fp32 for {sum(agree)} of {total} tokens {agree}; perplexity, the first "
            f"{args.decode_chunks} chunk(s) token by token: fp32 {dec_fp32:.3f}, int8 {dec:.3f} "
            f"({found[isa][1]:+.2f}%)",
            flush=True,
        )
    from benchmarks.decode_speed import PROMPT, gguf_file  # here: decode_speed imports this module

    theirs = llama_cpp_agreement(checkpoint, prompts, args.tokens, args.gguf_dir)
    gguf, vs = None, ""
    if theirs:
        print(f"llama.cpp q8_0 follows llama.cpp f32 for {sum(theirs[0])} of {sum(theirs[1])} tokens: {theirs[0]}")
        gguf, vs = gguf_file(checkpoint, "q8_0", args.gguf_dir), f"; llama.cpp q8_0: {sum(theirs[0])} of {total}"
    story = fp32.encode_instruction(PROMPT)  # a long answer: no early end of text
    rounds = speed_rounds(fp32, int8, list(found), story, 2 * args.tokens, args.rounds, gguf) if args.rounds else []
    use_kernel(args.kernels.split(",")[0])
    rows = [
        f"{isa}: agreement {a} of {total}, {d:+.2f}% decode path"
        + (f", {ratio(rounds, isa, 'fp32'):.2f}x fp32" if rounds else "")
        + (f", {ratio(rounds, isa, 'llama.cpp q8_0'):.2f}x llama.cpp q8_0" if rounds and gguf else "")
        for isa, (a, d) in found.items()
    ]
    print(
        f"int8_quality ({torch.get_num_threads()} thread(s), medians of {args.rounds} back-to-back rounds): "
        f"perplexity {100 * (ppl[1] / ppl[0] - 1):+.2f}% prefill path; {'; '.join(rows)}{vs}"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    p.add_argument("--chunks", type=int, default=4, help="perplexity chunks of 512 tokens (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="back-to-back speed rounds (default 3; 0: none)")
    p.add_argument("--decode_chunks", type=int, default=1, help="chunks scored token by token (default 1)")
    p.add_argument(
        "--kernels",
        default="auto,avx512vnni8",
        help="ALPACA_INT8_KERNEL values to measure, comma-separated (default auto,avx512vnni8: the default and the "
        "8-bit-input products, where this CPU has them)",
    )
    p.add_argument("--gguf_dir", default=str(REPO_ROOT / "out" / "bench"), help="where the GGUF files are made once")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
