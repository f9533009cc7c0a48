"""Which int8 product is fastest on this CPU: each of the kernel's instruction sets (csrc/int8.cpp) on one input row
against the embedded model's weight shapes, next to the fp32 kernel on the same weights, in one run.

    python -m benchmarks.int8_kernels                  # one thread; --threads 2 for both cores

int8 weights x 16-bit input rows (the input row rounded in blocks of 32, products summed in int32: generic, avx2,
avxvnni, avx512vnni; auto picks the best of these) against int8 x 8-bit input rows (avx512vnni8, llama.cpp's
q8_0 x q8_0) and int8 weights widened to fp32 against the fp32 row (avx512f32). Each shape: the best of --repeat
calls, as billions of weights per second. The layer shapes (qkv 960 x 576, gate/up 3072 x 576, down 576 x 1536) fit
a core's L2 cache in int8; the 49152 x 576 output layer (28 MB in int8, 113 MB in fp32) does not, and reads from L3 or
memory (a call repeated reads it from wherever the last one left it). Last line: the headline.
"""

import argparse
import time

import torch

from alpaca_trainml.generation import int8

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: qkv, gate/up, down, output layer
ISAS = ["generic", "avx2", "avxvnni", "avx512vnni", "avx512vnni8", "avx512f32"]  # the last two: for comparison


def best_seconds(fn, operands, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*operands)
        times.append(time.perf_counter() - start)
    return min(times)


def main(args):
    torch.set_num_threads(args.threads)
    k = int8.kernel()
    if k is None:
        raise SystemExit("the decode kernel is not available here")
    torch.manual_seed(0)
    rates = {}
    for out, n in SHAPES:
        w, x = torch.randn(out, n) * 0.05, torch.randn(1, n)
        packed = int8.quantize(w)
        row = {"fp32": best_seconds(k.matvec, (x, w), args.repeat)}
        for isa in ISAS:
            try:
                k.q8_isa(isa)
            except RuntimeError:
                continue  # this CPU lacks it
            row[isa] = best_seconds(k.q8_matvec, (x, packed), args.repeat)
        k.q8_isa("auto")
        rates[(out, n)] = {name: out * n / s / 1e9 for name, s in row.items()}
        print(f"{out:6d} x {n:4d}: " + ", ".join(f"{name} {r:.1f}" for name, r in rates[(out, n)].items()))
    total = {
        name: sum(out * n for out, n in SHAPES) / sum(out * n / r[name] for (out, n), r in rates.items())
        for name in rates[SHAPES[0]]
    }
    fastest, auto = max((n for n in total if n != "fp32"), key=total.get), k.q8_isa("auto")
    vs8 = (
        f", {total[auto] / total['avx512vnni8']:.2f}x avx512vnni8 (8-bit input rows)" if "avx512vnni8" in total else ""
    )
    print(
        f"int8_kernels ({args.threads} thread(s), billions of weights/s over the four shapes): "
        + ", ".join(f"{name} {r:.1f}" for name, r in total.items())
        + f"; fastest {fastest}, {total[fastest] / total['fp32']:.2f}x fp32; auto picks {auto}: "
        + f"{total[auto] / total['fp32']:.2f}x fp32{vs8}"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=50, help="calls per shape and kernel; the best counts (default 50)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
