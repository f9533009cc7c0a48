"""GGUF weight types side by side: file size and llama.cpp's perplexity on held-out text, each type next to f16, in
one run on one machine.

    python -m benchmarks.gguf_quants                      # the embedded SmolLM2-135M, the repo's own docs as text
    python -m benchmarks.gguf_quants --text held_out.txt --chunks 16

export_gguf.py writes f16, q8_0 and q4_0 to q5_1 (gguf's quantizers); the k-quants are llama.cpp's own quantizer run
on that f16 file (here, or in .venv-peers when llama-cpp-python is not installed here). Perplexity: llama.cpp
(benchmarks/gguf_perplexity_peer.py in .venv-peers) over --chunks chunks of --n_ctx tokens, every token after each
chunk's first scored. The default text is the repository's README.md and docs/*.md, prose no model was trained on;
--text takes any text file, or Alpaca JSON rows (instruction, input and output joined). A type whose llama.cpp row
crashes or times out is recorded as such and the run goes on. Last line: the headline.
"""

import argparse
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from alpaca_trainml import REPO_ROOT
from alpaca_trainml.export import kquants
from alpaca_trainml.export.gguf import export
from alpaca_trainml.models import resolve_model_path

PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0"]


def held_out_text(path):
    if path is None:
        return "\n\n".join(p.read_text() for p in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))])
    text = Path(path).read_text()
    if path.endswith(".json"):
        return "\n\n".join(
            "\n".join(r[k] for k in ("instruction", "input", "output") if r.get(k)) for r in json.loads(text)
        )
    return text


def make(checkpoint, outtype, work, f16):
    """The file of one type: export_gguf's path, and the k-quants from our f16 file through llama.cpp's quantizer."""
    out = work / f"model-{outtype}.gguf"
    if outtype not in kquants.K_QUANTS:
        return export(checkpoint, out, outtype)
    if kquants.quantizer() is not None:
        return kquants.quantize(f16, out, outtype)
    code = "import sys; from alpaca_trainml.export import kquants; kquants.quantize(*sys.argv[1:4])"
    run = subprocess.run(
        [str(PEERS_PYTHON), "-c", code, str(f16), str(out), outtype],
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(f"{outtype}: llama.cpp's quantizer in .venv-peers failed: {run.stderr[-1000:]}")
    return out


def perplexity(path, args, text):
    """{'perplexity', 'tokens'} from llama.cpp, or {'error': what happened} when the peer crashed or timed out."""
    job = dict(model=str(path), text=text, n_ctx=args.n_ctx, chunks=args.chunks, threads=args.threads)
    peer = [str(PEERS_PYTHON), str(Path(__file__).with_name("gguf_perplexity_peer.py"))]
    try:
        run = subprocess.run(peer, input=json.dumps(job), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.timeout} s")
    if run.returncode != 0:
        how = f"killed by {signal.Signals(-run.returncode).name}" if run.returncode < 0 else f"exit {run.returncode}"
        last = (run.stderr.strip().splitlines() or [""])[-1]
        return dict(error=f"{how}: {last[:200]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(args):
    checkpoint = resolve_model_path(args.model)
    text = held_out_text(args.text)
    rows, work = {}, Path(tempfile.mkdtemp(prefix="gguf_quants."))
    f16 = export(checkpoint, work / "model-f16.gguf", "f16")
    for outtype in args.types:
        start = time.perf_counter()
        path = f16 if outtype == "f16" else make(checkpoint, outtype, work, f16)
        rows[outtype] = dict(size=path.stat().st_size, made_s=time.perf_counter() - start)
        rows[outtype].update(perplexity(path, args, text))
        print(f"{outtype}: {json.dumps(rows[outtype])}", flush=True)
    base = rows["f16"]
    print(f"\n{args.model}; llama.cpp perplexity over {base.get('tokens')} tokens ({args.chunks} x {args.n_ctx})")
    print("| type | file MiB | size vs f16 | perplexity | vs f16 |\n|---|---|---|---|---|")
    for outtype, r in rows.items():
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else r["error"]
        rel = f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}%" if "perplexity" in r else "-"
        print(f"| {outtype} | {r['size'] / 2**20:.1f} | {r['size'] / base['size']:.2f} | {ppl} | {rel} |")
    q = rows.get("q4_k_m", {})
    if "perplexity" in q:
        print(
            f"gguf_quants: q4_k_m is {q['size'] / base['size']:.2f} of f16's size at "
            f"{100 * (q['perplexity'] / base['perplexity'] - 1):+.2f}% perplexity"
        )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m", help="checkpoint folder or embedded:smollm2-135m")
    p.add_argument("--text", default=None, help="held-out text file, or Alpaca JSON rows (default: the repo's docs)")
    p.add_argument("--types", nargs="+", default=TYPES, choices=TYPES, help="f16 first: the others are compared to it")
    p.add_argument("--n_ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=900, help="seconds per llama.cpp row")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
