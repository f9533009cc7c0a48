"""Throughput of serve.py under mixed traffic: the same requests from several clients at once (continuous batching)
against one at a time, on one loaded model.

    python -m benchmarks.serve_throughput                      # the embedded SmolLM2-135M, 32 requests, 8 clients
    python -m benchmarks.serve_throughput --model_name_or_path out/demo --requests 64 --max_tokens 64

The mix: /v1/completions and /v1/chat/completions, streaming (with stream_options.include_usage) and not,
temperatures 0 to 1, two top_p values. Completion tokens per second come from the answers' usage. The baseline
sends the same requests through the same server one after another, as a single client would: each request then
has the model to itself, which is what every request had before continuous batching.
Prints both rates and the latencies, and last `serve_throughput_ratio: X` (concurrent tokens/s / sequential).
"""

import argparse
import json
import logging
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from tqdm import tqdm

import inference
import serve
from alpaca_trainml.data.prompts import format_prompt

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
TEMPERATURES = [0, 0.3, 0.7, 1.0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(n, max_tokens):
    """n (path, body) requests: completions and chat, streaming and not, temperatures 0 to 1, in a fixed mix."""
    requests = []
    for i in range(n):
        text, chat, stream = INSTRUCTIONS[i % len(INSTRUCTIONS)], i % 2 == 0, i % 4 >= 2
        body = dict(max_tokens=max_tokens, temperature=TEMPERATURES[(i // 4) % 4], top_p=[1.0, 0.9][(i // 2) % 2])
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = format_prompt(text)
        if stream:
            body |= dict(stream=True, stream_options={"include_usage": True})
        requests.append(("/v1/chat/completions" if chat else "/v1/completions", body))
    return requests


def send(http, path, body):
    """(completion tokens, seconds) for one request, read to its end."""
    start = time.perf_counter()
    if not body.get("stream"):
        r = http.post(path, json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"], time.perf_counter() - start
    tokens = None
    with http.stream("POST", path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    if tokens is None:
        raise RuntimeError(f"{path}: the stream carried no usage")
    return tokens, time.perf_counter() - start


def run(url, requests, clients, label):
    """(completion tokens per second, latencies) with `clients` requests in flight at a time."""
    with httpx.Client(base_url=url, timeout=1800) as http, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        answers = list(tqdm(pool.map(lambda req: send(http, *req), requests), label, len(requests), mininterval=5))
        elapsed = time.perf_counter() - start
    return sum(t for t, _ in answers) / elapsed, [s for _, s in answers]


def p95(values):
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def main(args):
    model = inference.load_model(args.model_name_or_path)
    requests = workload(args.requests, args.max_tokens)
    argv = ["--port", str(free_port()), "--max_batch_size", str(args.clients), "--log_level", "warning"]
    with serve.ServerThread(serve.build_server(serve.parse_args(argv), model=model)) as running:
        run(running.url, requests[:2], 2, "warm-up")  # first-call costs are not throughput
        seq_rate, seq_lat = run(running.url, requests, 1, "one at a time")
        conc_rate, conc_lat = run(running.url, requests, args.clients, f"{args.clients} clients")
    print(f"model: {model.name} on {model.model.device}; {len(requests)} requests, max_tokens {args.max_tokens}")
    print(f"one at a time: {seq_rate:.1f} completion tokens/s; latency p50 {statistics.median(seq_lat):.2f} s")
    print(
        f"{args.clients} clients: {conc_rate:.1f} completion tokens/s; "
        f"latency p50 {statistics.median(conc_lat):.2f} s, p95 {p95(conc_lat):.2f} s"
    )
    print(f"serve_throughput_ratio: {conc_rate / seq_rate:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8, help="requests in flight at once (also --max_batch_size)")
    p.add_argument("--max_tokens", type=int, default=32)
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
