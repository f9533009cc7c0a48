"""Throughput of serve.py under mixed traffic: the same requests from several clients at once (continuous batching)
against one at a time, on one loaded model, and against the limit of the machine, measured in the same run.

    python -m benchmarks.serve_throughput                      # the embedded SmolLM2-135M, 32 requests, 8 clients
    python -m benchmarks.serve_throughput --model_name_or_path out/demo --requests 64 --max_tokens 64

The mix: /v1/completions and /v1/chat/completions, streaming (with stream_options.include_usage) and not,
temperatures 0 to 1, two top_p values. Completion tokens per second come from the answers' usage. The baseline
sends the same requests through the same server one after another, as a single client would: each request then
has the model to itself, which is what every request had before continuous batching.

The prefix cache (serve.py's --prefix_cache_mb, on by default): the mix has 8 distinct prompts (8 instructions, each
as a completion or a chat), each sent 4 times, and all completions open with the Alpaca preamble, so a warm cache
would skip most prefill. Each measured run starts on a fresh server, its cache empty; the clients' run is also
made on a server without the cache, printed before the headline.

The limit: a decode step of n rows reads every weight once, so n clients can make at most n times the batch-1 bound
(the weights' bytes read at the read bandwidth measured in this run, as benchmarks/decode_speed.py measures it), and
never more than the cores' compute allows (the best rate of a large matmul in the model's dtype, in FLOP/s, over 2
FLOP per parameter per token); the lower of the two. Prefill is not in it: the limit counts completion tokens only.
That is the headline's limit (issue 34's). A second line, labelled as such, counts the prompts too: the mix's prompts
(each request's prompt tokens as the server encodes them) take compute as well, so the cores' matmul rate is spread
over prompt + completion tokens, and the completion tokens/s it leaves is that rate times completion / (prompt +
completion); that limit is the lower of it and the bandwidth side.
Prints both rates, the latencies and the limits, and last
`serve_throughput: N clients X tok/s = R of the limit (L tok/s); Yx one at a time`.
"""

import argparse
import json
import logging
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import torch
from tqdm import tqdm

import inference
import serve
from alpaca_trainml.data.prompts import format_prompt
from alpaca_trainml.generation.prefix_cache import DEFAULT_MB

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


def run(url, requests, clients, label, timeout=1800):
    """(completion tokens per second, latencies) with `clients` requests in flight at a time; a request that takes
    over `timeout` seconds raises httpx.TimeoutException."""
    with httpx.Client(base_url=url, timeout=timeout) as http, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        answers = list(tqdm(pool.map(lambda req: send(http, *req), requests), label, len(requests), mininterval=5))
        elapsed = time.perf_counter() - start
    return sum(t for t, _ in answers) / elapsed, [s for _, s in answers]


def p95(values):
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def matmul_flops(dtype, n=2048, repeat=5):
    """The cores' compute in FLOP/s: the best of `repeat` (n, n) @ (n, n) products in `dtype` on torch's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def prompt_tokens(model, requests):
    """The prompt tokens of the requests, as serve.py encodes them (the same InstructModel calls)."""
    return sum(
        len(model.encode_chat(b["messages"]) if "messages" in b else model.encode(b["prompt"])) for _, b in requests
    )


def with_prefill(rates, prompt, completion, clients):
    """(completion tokens/s, a line): the limit when the prompts' prefill compute counts too; rates: limit()'s
    (batch-1 bound, cores' compute) in tokens/s."""
    bound, compute = rates
    share = completion / (prompt + completion)
    rate = min(clients * bound, compute * share)
    return rate, (
        f"limit counting the prompts' prefill: the cores' matmul {compute:.0f} tokens/s over {prompt} prompt + "
        f"{completion} completion tokens = {compute * share:.0f} completion tokens/s; the lower with x{clients} of "
        f"the bound: {rate:.0f} tokens/s"
    )


def limit(model, clients):
    """(limit tokens/s, lines that say how it was found, (batch-1 bound, compute) tokens/s) for `clients` rows per
    decode step."""
    from benchmarks.decode_speed import bandwidth_gbs, weight_bytes  # here: decode_speed imports this module

    params = sum(p.numel() for p in model.model.parameters())  # tied embeddings once: the lm_head's read
    nbytes, gbs = weight_bytes(model.model), bandwidth_gbs(repeat=3)
    flops = matmul_flops(next(model.model.parameters()).dtype)
    bound, compute = gbs * 1e9 / nbytes, flops / (2 * params)
    lines = [
        f"batch-1 bound: {nbytes / 2**20:.0f} MiB of weights at {gbs:.1f} GB/s = {bound:.1f} tokens/s; "
        f"x{clients} = {clients * bound:.0f}",
        f"cores' matmul: {flops / 1e9:.0f} GFLOP/s / {2 * params / 1e9:.2f} GFLOP per token = {compute:.0f} tokens/s",
    ]
    return min(clients * bound, compute), lines, (bound, compute)


@contextmanager
def serving(model, args, prefix_cache_mb):
    """A server on `model` with a fresh engine (its prefix cache empty), on its own port."""
    argv = ["--port", str(free_port()), "--max_batch_size", str(args.clients), "--log_level", "warning"]
    argv += ["--speculative", args.speculative] if args.speculative else []
    argv += ["--prefix_cache_mb", str(prefix_cache_mb)]
    with serve.ServerThread(serve.build_server(serve.parse_args(argv), model=model)) as running:
        yield running


def reuse_line(running):
    """What the server's prefix cache saved: prompt tokens copied, not prefilled."""
    kept = running.server.engine.batch.prefixes
    if kept is None:
        return "prefix cache: off"
    return f"prefix cache: {kept.reused} of {kept.queried} prompt tokens copied from it, not prefilled"


def main(args):
    model = inference.load_model(args.model_name_or_path)
    requests = workload(args.requests, args.max_tokens)
    with serving(model, args, args.prefix_cache_mb) as running:
        run(running.url, requests[:2], 2, "warm-up")  # first-call costs are not throughput
    with serving(model, args, args.prefix_cache_mb) as running:
        seq_rate, seq_lat = run(running.url, requests, 1, "one at a time")
    with serving(model, args, args.prefix_cache_mb) as running:  # each run starts with the prefix cache empty
        # the bandwidth moves within minutes: read around the clients' run
        before, lines, rates = limit(model, args.clients)
        start = time.perf_counter()
        conc_rate, conc_lat = run(running.url, requests, args.clients, f"{args.clients} clients")
        completion = round(conc_rate * (time.perf_counter() - start))  # the answers' usage, summed
        after, _, after_rates = limit(model, args.clients)
        reuse = reuse_line(running)
    cold = None
    if args.prefix_cache_mb:  # the same run without it: what the cache is worth on this mix
        with serving(model, args, 0) as running:
            cold, _ = run(running.url, requests, args.clients, f"{args.clients} clients, no prefix cache")
    print(f"model: {model.name} on {model.model.device}; {len(requests)} requests, max_tokens {args.max_tokens}")
    print("\n".join(lines))
    best = max(before, after)
    print(
        f"limit at {args.clients} clients: {best:.0f} tokens/s (the lower of the two; the higher of the readings "
        f"before and after the clients' run: {before:.0f}, {after:.0f})"
    )
    prompts = prompt_tokens(model, requests)
    prefill, line = with_prefill(rates if before >= after else after_rates, prompts, completion, args.clients)
    print(f"{line}; {args.clients} clients = {conc_rate / prefill:.2f} of it")
    print(f"one at a time: {seq_rate:.1f} completion tokens/s; latency p50 {statistics.median(seq_lat):.2f} s")
    print(
        f"{args.clients} clients: {conc_rate:.1f} completion tokens/s; "
        f"latency p50 {statistics.median(conc_lat):.2f} s, p95 {p95(conc_lat):.2f} s; {reuse}"
    )
    if cold is not None:
        print(f"{args.clients} clients without the prefix cache: {cold:.1f} tokens/s = {cold / best:.2f} of the limit")
    print(
        f"serve_throughput: {args.clients} clients {conc_rate:.1f} tok/s = {conc_rate / best:.2f} of the limit "
        f"({best:.0f} tok/s); {conc_rate / seq_rate:.2f}x one at a time"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8, help="requests in flight at once (also --max_batch_size)")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--speculative", default=None, help="serve.py's --speculative (ngram: prompt-lookup drafts)")
    p.add_argument(
        "--prefix_cache_mb",
        type=int,
        default=DEFAULT_MB,
        help=f"serve.py's --prefix_cache_mb (default {DEFAULT_MB}); with it on, the clients' run is also made without "
        "it, on a second server",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
