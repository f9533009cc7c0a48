"""What a speculative verify step of k positions costs against a plain decode step (k = 1), on the decode kernel, for
each of its fp32 matmul's instruction sets (csrc/f32.cpp), and optionally another checkout's kernel, in one run.

    python -m benchmarks.verify_cost                   # the embedded SmolLM2-135M, fp32, torch's threads
    python -m benchmarks.verify_cost --baseline_csrc /path/to/other/checkout/alpaca_trainml/generation/csrc

One model, one LlamaStep per side (each with its own kernel module: the baseline's is built from its decode.cpp,
int8.cpp and, where it has one, f32.cpp), each prefilled with the same 171-token prompt. Then --repeat rounds, each
timing every side at every k back to back (the order alternating), with LlamaStep.decode for k = 1 and
LlamaStep.verify for more, the cache rewound after each. Per side and k: the best and the median in ms, and the best
over that side's best plain step: what a verify of k positions costs in plain steps. A draft of k - 1 tokens pays off
when it makes more tokens per step than that. Last line: the headline.
"""

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import torch

from alpaca_trainml.generation import matvec
from alpaca_trainml.generation.llama_step import LlamaStep
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.models import resolve_model_path

TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # 171 prompt tokens with the instruction


def baseline_kernel(csrc):
    """The kernel module built from another checkout's sources (its own extension name: both load in one process)."""
    from torch.utils.cpp_extension import load

    sources = [Path(csrc) / n for n in ("decode.cpp", "int8.cpp", "f32.cpp") if (Path(csrc) / n).exists()]
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in sources)).hexdigest()[:10]
    _, flags = matvec.variant()
    return load(
        f"alpaca_decode_baseline_{digest}", [str(s) for s in sources], extra_cflags=flags, extra_ldflags=["-fopenmp"]
    )


def sides(model, args):
    """[(name, LlamaStep, kernel, isa or None)]: ours for each instruction set this CPU runs, then the baseline."""
    ours = matvec.kernel()
    if ours is None:
        raise SystemExit("the decode kernel is not available here")
    out, step = [], LlamaStep(model)
    for isa in args.isas.split(","):
        try:
            ours.f32_isa(isa)
        except RuntimeError:
            print(f"{isa}: not on this CPU")
            continue
        out.append((f"ours {isa}", step, ours, isa))
    ours.f32_isa("auto")
    if args.baseline_csrc:
        theirs = baseline_kernel(args.baseline_csrc)
        real = matvec.kernel
        matvec.kernel = lambda: theirs  # LlamaStep takes its decoder from matvec.kernel()
        try:
            out.append(("baseline", LlamaStep(model), theirs, None))
        finally:
            matvec.kernel = real
    return out


def main(args):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    m = InstructModel(resolve_model_path(args.model_name_or_path), dtype="float32")
    ids = m.encode_instruction("Summarise the following text.", TEXT)
    runs = sides(m.model, args)
    for step in {id(s): s for _, s, _, _ in runs}.values():
        step.prefill([ids])
    ks = [int(k) for k in args.positions.split(",")]
    tokens = torch.tensor([ids[5 : 5 + max(ks)]])
    times = {(name, k): [] for name, *_ in runs for k in ks}
    for rep in range(args.repeat):
        for k in ks:
            for name, step, kernel, isa in runs if rep % 2 == 0 else runs[::-1]:
                if isa:
                    kernel.f32_isa(isa)
                start = time.perf_counter()
                step.decode(tokens[0, :1]) if k == 1 else step.verify(tokens[:, :k])
                step.rewind([k])
                times[name, k].append(time.perf_counter() - start)
    matvec.kernel().f32_isa("auto")
    print(f"{len(ids)}-token prompt, {torch.get_num_threads()} thread(s), best of {args.repeat}")
    print(f"{'side':14s} " + " ".join(f"{f'k={k}':>20s}" for k in ks))
    cost = {}
    for name, *_ in runs:
        one = min(times[name, 1])
        cost[name] = {k: min(times[name, k]) / one for k in ks}
        cells = [
            f"{min(times[name, k]) * 1e3:.1f}/{statistics.median(times[name, k]) * 1e3:.1f}ms {cost[name][k]:.2f}"
            for k in ks
        ]
        print(f"{name:14s} " + " ".join(f"{c:>20s}" for c in cells))
    k = 5 if 5 in ks else ks[-1]
    print(
        f"verify_cost: a verify of {k} positions costs, in plain steps: "
        + ", ".join(f"{name} {c[k]:.2f}" for name, c in cost.items())
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--positions", default="1,2,3,5,8", help="positions per step to time (1: a plain decode step)")
    p.add_argument("--isas", default="avx2,avx512", help="our fp32 matmul's instruction sets to time")
    p.add_argument("--baseline_csrc", default=None, help="another checkout's generation/csrc folder, timed alongside")
    p.add_argument("--repeat", type=int, default=15, help="rounds; the best counts (default 15)")
    p.add_argument("--threads", type=int, default=0, help="default: torch's")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
