"""A load and fault run against `python serve.py` in its own process: many concurrent clients for minutes, with the
traffic a public endpoint gets, and one question: does the server stay correct, bounded and responsive?

    python -m benchmarks.load_run                                   # the embedded model, 64 clients, 5 minutes
    python -m benchmarks.load_run --clients 8 --duration 30 --kill_one
    python -m benchmarks.load_run --adapters 4 --json --kill_one         # the whole mix of issue 33
    python -m benchmarks.load_run --lora_modules a=out/lora-a b=out/lora-b --json

Each client loops until the time is up, picking its next request from a fixed, seeded mix:
- completions and chats, streaming (with usage) and not, greedy and sampled;
- a stream that the client leaves after its first event (a closed tab);
- a bad body (broken JSON, wrong types, out-of-range values, an unknown model, too large a body): each must get a
  4xx with our error body;
- with --lora_modules (or --adapters N, made here as benchmarks/lora_serving.py makes them), requests whose `model`
  names one of the adapters;
- with --json, requests with `response_format` json_object or a json_schema, whose answers must parse (and, when
  they finish by `stop`, validate against the schema).
With --kill_one, one more client runs in its own process, streaming, and is killed with SIGKILL at a random moment:
the server sees its connection reset mid-answer.

The server's resident memory is read from /proc every 5 s. Reported: requests by kind and status, every 5xx (there
should be none), answers that broke their contract, p50/p99 latency, completion tokens per second over the run,
memory at the first sample after warm-up against the end, and the ERROR or Traceback lines in the server's log.
Everything goes to 127.0.0.1 only, and the run stops by itself (each request has a timeout; the server is stopped).
The last line is the headline.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve_throughput import INSTRUCTIONS, free_port

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["name", "count"],
}
BAD_BODIES = [  # (content, content type): each must get a 4xx
    ('{"prompt": "x", ', "application/json"),
    ('{"prompt": 5}', "application/json"),
    ('{"messages": "hello"}', "application/json"),
    ('{"prompt": "x", "max_tokens": -1}', "application/json"),
    ('{"prompt": "x", "temperature": "hot"}', "application/json"),
    ('{"prompt": "x", "model": "no-such-model"}', "application/json"),
    ("prompt=x", "application/x-www-form-urlencoded"),
]
KINDS = ["completion", "completion_stream", "chat", "chat_stream", "leave_stream", "bad_body"]


def request_for(kind, rng, args):
    """(path, body) for one request of this kind; body is a dict, or (text, content type) for a bad body."""
    text = rng.choice(INSTRUCTIONS)
    if kind == "bad_body":
        if rng.random() < 0.15:
            return "/v1/completions", ("{" + '"prompt": "' + "x" * (2 << 20) + '"}', "application/json")
        return rng.choice(["/v1/completions", "/v1/chat/completions"]), rng.choice(BAD_BODIES)
    chat = kind.startswith("chat") or kind == "adapter" or (kind.startswith("json") and rng.random() < 0.5)
    body = {"max_tokens": args.max_tokens, "temperature": rng.choice([0, 0.7, 1.0])}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = f"Instruction: {text}\nAnswer:"
    if kind.endswith("stream"):
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if kind == "adapter":
        body["model"] = rng.choice(args.adapter_names)
    if kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    if kind == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def answer_text(path, payload):
    choice = payload["choices"][0]
    return (choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]), choice[
        "finish_reason"
    ]


def broken_json(kind, text, finish):
    """Why a JSON-mode answer broke its contract, or None."""
    if not kind.startswith("json") or finish == "length":  # a cut answer may be incomplete (docs/operators.md)
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e})"
    if kind == "json_schema":
        import jsonschema

        try:
            jsonschema.validate(value, SCHEMA)
        except jsonschema.ValidationError as e:
            return f"does not validate ({e.message})"
    return None


async def streamed(http, path, body, leave):
    """(status, tokens, text, finish) of a streamed answer; leave=True closes the connection after the first event."""
    text, tokens, finish = [], 0, None
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, 0, "", None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if leave:
                return 200, 0, "", "left"
            event = json.loads(line[len("data: ") :])
            if "error" in event:  # an error after the status line: a server error (599) unless it names the request's
                return (599 if event["error"].get("type") == "server_error" else 499), tokens, "", "error event"
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                text.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
    return 200, tokens, "".join(text), finish


async def one(http, kind, path, body):
    """(status, tokens, broken) for one request."""
    if isinstance(body, tuple):
        r = await http.post(path, content=body[0], headers={"content-type": body[1]})
        ok = 400 <= r.status_code < 500 and "error" in r.json()
        return r.status_code, 0, None if ok or r.status_code >= 500 else f"bad body answered {r.status_code}"
    if body.get("stream"):
        status, tokens, text, finish = await streamed(http, path, body, leave=kind == "leave_stream")
    else:
        r = await http.post(path, json=body)
        status, tokens, text, finish = r.status_code, 0, "", None
        if status == 200:
            payload = r.json()
            tokens = payload["usage"]["completion_tokens"]
            text, finish = answer_text(path, payload)
    return status, tokens, broken_json(kind, text, finish) if status == 200 else None


async def client(i, url, args, kinds, deadline, records):
    rng = random.Random(args.seed * 1000 + i)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as http:
        while time.monotonic() < deadline:
            kind = rng.choice(kinds)
            path, body = request_for(kind, rng, args)
            start = time.monotonic()
            try:
                status, tokens, broken = await one(http, kind, path, body)
            except (httpx.HTTPError, ValueError) as e:
                status, tokens, broken = 0, 0, f"{type(e).__name__}: {e}"
            records.append(dict(kind=kind, status=status, tokens=tokens, broken=broken, s=time.monotonic() - start))


KILLED_CLIENT = """
import httpx, sys
body = {"prompt": "Instruction: Write a long story.\\nAnswer:", "max_tokens": 4000, "stream": True}
while True:
    with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            pass
"""


async def kill_one(url, duration, rng):
    """One streaming client in its own process, killed with SIGKILL at a random moment of the run."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, url], stderr=subprocess.DEVNULL)
    at = rng.uniform(0.2, 0.8) * duration
    await asyncio.sleep(at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return at


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def sample_memory(pid, deadline, samples):
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), rss_mib(pid)))
        await asyncio.sleep(5)


def start_server(args, log):
    port = free_port()
    cmd = [sys.executable, "serve.py", "--port", str(port), "--max_batch_size", str(args.max_batch_size)]
    cmd += ["--model_name_or_path", args.model_name_or_path] if args.model_name_or_path else []
    cmd += ["--lora_modules", *args.lora_modules] if args.lora_modules else []
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(args.start_timeout):
        if proc.poll() is not None:
            raise SystemExit(f"serve.py exited with {proc.returncode} before it answered; its log: {log.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                warm = {"prompt": "Hi", "max_tokens": 2}  # the first step may build the decode kernel: not timed
                httpx.post(url + "/v1/completions", json=warm, timeout=args.start_timeout).raise_for_status()
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"serve.py did not answer within {args.start_timeout} s; its log: {log.name}")


async def run(url, pid, args):
    kinds = KINDS + (["adapter"] if args.lora_modules else []) + (["json_object", "json_schema"] if args.json else [])
    start = time.monotonic()
    deadline = start + args.duration
    records, memory = [], []
    tasks = [client(i, url, args, kinds, deadline, records) for i in range(args.clients)]
    tasks.append(sample_memory(pid, deadline, memory))
    killed = [kill_one(url, args.duration, random.Random(args.seed))] if args.kill_one else []
    results = await asyncio.gather(*tasks, *killed)
    return records, memory, time.monotonic() - start, results[-1] if args.kill_one else None


def percentile(values, q):
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(records, memory, elapsed, log_text, killed_at, args):
    """Prints the tables; returns the headline."""
    by = {}
    for r in records:
        by.setdefault((r["kind"], r["status"]), []).append(r)
    print(f"{'kind':<18}{'status':>7}{'count':>7}{'p50 s':>8}{'p99 s':>8}")
    for (kind, status), rs in sorted(by.items()):
        s = [r["s"] for r in rs]
        print(f"{kind:<18}{status:>7}{len(rs):>7}{percentile(s, 50):>8.2f}{percentile(s, 99):>8.2f}")
    answered = [r["s"] for r in records if r["status"] == 200 and r["kind"] != "leave_stream"]
    server_errors = [r for r in records if r["status"] >= 500]
    failed = [r for r in records if r["status"] == 0]
    broken = [r for r in records if r["broken"]]
    tokens = sum(r["tokens"] for r in records)
    for r in (server_errors + failed + broken)[:10]:
        print(f"  {r['kind']}: status {r['status']} {r['broken'] or ''}")
    bad_lines = [line for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line]
    for line in bad_lines[:5]:
        print(f"  server log: {line}")
    after_warmup = [m for t, m in memory if t - memory[0][0] >= 60] or [m for _, m in memory]
    grew = after_warmup[-1] - after_warmup[0] if after_warmup else float("nan")
    if killed_at is not None:
        print(f"one streaming client killed with SIGKILL {killed_at:.0f} s into the run")
    minutes = [f"{m:.0f}" for t, m in memory if int(t - memory[0][0]) % 60 < 5]
    print(
        f"server memory: {after_warmup[0]:.0f} MiB after warm-up, {after_warmup[-1]:.0f} MiB at the end, peak "
        f"{max(m for _, m in memory):.0f} MiB; each minute: {' '.join(minutes)} MiB"
    )
    return (
        f"load_run: {args.clients} clients {elapsed:.0f} s{' +1 killed' if killed_at is not None else ''}: "
        f"{len(records)} requests, {len(server_errors)} 5xx, {len(failed)} failed, {len(broken)} broken, "
        f"{len(bad_lines)} log errors, p50 {percentile(answered, 50):.1f} s p99 {percentile(answered, 99):.1f} s, "
        f"{tokens / elapsed:.1f} tokens/s, memory {grew:+.0f} MiB after warm-up"
    )


def make_adapters(args, folder):
    """--adapters N: N random rank-8 adapters of the model, saved in folder, as --lora_modules entries."""
    import inference
    from benchmarks.lora_serving import make_adapters as make

    model = inference.load_model(args.model_name_or_path, dtype="float32")
    return [f"{name}={path}" for name, path in make(model, folder, args.adapters, rank=8).items()]


def main(args):
    with tempfile.TemporaryDirectory() as adapters:
        if args.adapters:
            args.lora_modules = (args.lora_modules or []) + make_adapters(args, adapters)
        args.adapter_names = [m.split("=", 1)[0] for m in args.lora_modules or []]
        serve_and_load(args)


def serve_and_load(args):
    with tempfile.NamedTemporaryFile("w+", prefix="load_run_serve_", suffix=".log", delete=False) as log:
        proc, url = start_server(args, log)
        try:
            records, memory, elapsed, killed_at = asyncio.run(run(url, proc.pid, args))
            alive = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=120)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        headline = report(records, memory, elapsed, log.read(), killed_at, args)
    print(f"after the run the server answered {alive.status_code}; its log: {log.name}")
    print(headline)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="default: serve.py's (the embedded model)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=300, help="seconds of traffic")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--lora_modules", nargs="*", default=None, help="name=path adapters: serve them, and ask for them")
    p.add_argument("--adapters", type=int, default=0, help="make N random adapters of the model and serve them too")
    p.add_argument("--json", action="store_true", help="send response_format requests too")
    p.add_argument("--kill_one", action="store_true", help="one more streaming client, SIGKILLed at random")
    p.add_argument("--request_timeout", type=float, default=600)
    p.add_argument("--start_timeout", type=int, default=300, help="seconds for serve.py to load")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0:
        p.error("--clients must be at least 1 and --duration positive")
    return args


if __name__ == "__main__":
    main(parse_args())
