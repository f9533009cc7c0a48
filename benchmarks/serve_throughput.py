"""Requests per second: serve.py with 8 concurrent clients against sequential instruct() calls, same model, same run.

    python -m benchmarks.serve_throughput                       # the embedded SmolLM2-135M, on CPU or GPU
    python -m benchmarks.serve_throughput --model_name_or_path out/demo --requests 32 --max_tokens 64

Both sides answer the same instructions greedily with the same max_tokens, on one loaded model. The sequential side
is the fork's way of serving, one instruct() call at a time; the server batches requests that wait together.
Prints the latency of one request, both rates, and last `serve_throughput_ratio: X` (server / sequential).
"""

import argparse
import logging
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

import inference  # noqa: E402
import serve  # noqa: E402

INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Name the planets of the solar system.",
    "Explain why the sky is blue.",
    "Write a haiku about autumn.",
    "Suggest a name for a bakery.",
    "Describe a rainy day in two sentences.",
    "List four kinds of fruit.",
    "What is a prime number?",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sequential(instructions, max_tokens):
    start, latencies = time.perf_counter(), []
    for i, text in enumerate(instructions, 1):
        t = time.perf_counter()
        inference.instruct(text, max_tokens=max_tokens, temperature=0)
        latencies.append(time.perf_counter() - t)
        print(f"sequential: request {i}/{len(instructions)} took {latencies[-1]:.2f} s", flush=True)
    return len(instructions) / (time.perf_counter() - start), latencies


def run_concurrent(url, instructions, max_tokens, clients):
    body = lambda text: {"instruction": text, "max_tokens": max_tokens, "temperature": 0}  # noqa: E731
    with httpx.Client(base_url=url, timeout=600) as http, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        responses = list(pool.map(lambda text: http.post("/instruct", json=body(text)), instructions))
        elapsed = time.perf_counter() - start
    bad = [r.text for r in responses if r.status_code != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return len(instructions) / elapsed


def main(args):
    engine = inference.load_model(args.model_name_or_path)
    work = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(args.requests)]
    print(f"loaded {engine.name}; warming up", flush=True)
    inference.instruct(work[0], max_tokens=4, temperature=0)  # warm up: first-call costs are not throughput
    server_args = serve.parse_args(
        ["--port", str(free_port()), "--max_batch_size", str(args.max_batch_size), "--log_level", "warning"]
    )
    with serve.ServerThread(serve.build_server(server_args, engine=engine)) as running:  # shares the loaded model
        seq_rps, latencies = run_sequential(work, args.max_tokens)
        print(f"concurrent: {len(work)} requests from {args.clients} clients", flush=True)
        conc_rps = run_concurrent(running.url, work, args.max_tokens, args.clients)
    print(f"model: {engine.name} on {engine.model.device}; {args.requests} requests, max_tokens {args.max_tokens}")
    print(f"one request (sequential instruct()): median {statistics.median(latencies):.2f} s")
    print(f"sequential instruct(): {seq_rps:.3f} requests/s")
    print(f"serve.py, {args.clients} concurrent clients: {conc_rps:.3f} requests/s")
    print(f"serve_throughput_ratio: {conc_rps / seq_rps:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--max_batch_size", type=int, default=8)
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
