"""Throughput of serve.py with LoRA adapters per request (--lora_modules): 8 clients spread over 4 adapters against
8 clients on one adapter, and the base alone for scale, on one server and one loaded model, in back-to-back rounds.

    python -m benchmarks.lora_serving                          # the embedded SmolLM2-135M, 4 adapters of rank 16
    python -m benchmarks.lora_serving --model_name_or_path out/demo --rounds 3 --max_tokens 64

The adapters are made here: every linear layer of the base (q, k, v, o, gate, up, down), rank --rank, A and B
random with B scaled down (so that the text stays near the base's, and the answers' lengths with it). Each client
sends --requests_per_client greedy completions one after another; tokens/s counts the answers' completion tokens.
A round runs the three set-ups back to back (spread over 4 adapters, all on one adapter, the base); --rounds rounds
give the minimum and the median of each.

Then one decode step of 8 rows timed on its own, by the way each could run: our step (lora_step.LoraStep: each
adapter's delta on its rows, the base's matmuls shared), and peft's mixed batch (`adapter_names=`, one adapter per
row) through transformers' forward, which is what serve.py would run without our step.
Last line: `lora_spread_vs_one_adapter: X` (tokens/s over 4 adapters / tokens/s on one).
"""

import argparse
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

import inference
import serve
from alpaca_trainml.generation.hf_step import HFStep
from alpaca_trainml.generation.lora_step import LoraStep
from benchmarks.serve_throughput import INSTRUCTIONS, free_port

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model, folder, n, rank):
    """n adapters on the loaded base, saved as peft saves them: {name: folder}."""
    from peft import LoraConfig, get_peft_model

    folders = {}
    for i in range(n):
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(model.model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)  # a small delta: text near the base's
        folders[f"lora{i}"] = Path(folder) / f"lora{i}"
        peft_model.save_pretrained(folders[f"lora{i}"])
        model.model = peft_model.unload()  # the base back, unchanged
    return folders


def clients_run(url, models, per_client, max_tokens):
    """Completion tokens per second with one client per entry of `models` (its request's model), each sending
    per_client requests one after another."""

    def client(i):
        tokens = 0
        with httpx.Client(base_url=url, timeout=1800) as http:
            for k in range(per_client):
                prompt = INSTRUCTIONS[(i + k) % len(INSTRUCTIONS)]
                body = dict(prompt=prompt, max_tokens=max_tokens, temperature=0, model=models[i])
                r = http.post("/v1/completions", json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        tokens = sum(pool.map(client, range(len(models))))
    return tokens / (time.perf_counter() - start)


def step_times(model, adapters, rows, steps):
    """{way: [seconds of each decode step of `rows` rows]}: our LoraStep over 4 adapters, over 1, over none (the
    kernel), and peft's mixed batch over 4; the ways take turns, one step each, so that a load that comes and goes
    on a shared machine falls on all of them alike."""
    from peft import PeftModel

    ids = [model.encode(INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(rows)]
    names = list(adapters.by_name)
    ways = {}
    for label, per_row in [
        ("our step, 4 adapters", [adapters.get(names[i % 4]) for i in range(rows)]),
        ("our step, 1 adapter", [adapters.get(names[0])] * rows),
        ("our step, base (kernel)", [None] * rows),
    ]:
        step = LoraStep(model.model)  # each its own cache; they share the model's weights
        step.prefill(ids, per_row)
        nxt = torch.zeros(rows, dtype=torch.long)
        ways[label] = lambda step=step, nxt=nxt: step.decode(nxt)
    # peft wraps the same weights (our steps above hold the tensors, not the modules, and keep working)
    peft_model = PeftModel.from_pretrained(model.model, adapters.get(names[0]).path, adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters.get(name).path, adapter_name=name)
    ways["peft adapter_names, 4 adapters"] = peft_stepper(peft_model, ids, [names[i % 4] for i in range(rows)])
    times = {label: [] for label in ways}
    for k in range(steps + 1):
        for label, step in ways.items():
            start = time.perf_counter()
            step()
            if k:  # the first round is a warm-up
                times[label].append(time.perf_counter() - start)
    model.model = peft_model.unload()
    return times


def peft_stepper(peft_model, ids, adapter_names):
    """A function that runs one decode step through transformers' forward with peft's per-row adapters (the batch
    left-padded and prefilled here)."""
    from transformers import DynamicCache

    from alpaca_trainml.generation.kv_cache import left_pad

    input_ids, mask = left_pad(ids, 0, "cpu")
    state = {"mask": mask}
    cache = {HFStep(peft_model, 0).cache_arg: DynamicCache()}  # the cache's argument name in this transformers
    nxt = torch.zeros(len(ids), 1, dtype=torch.long)

    @torch.inference_mode()
    def forward(input_ids):  # positions left to transformers: off for the padded rows, the same arithmetic
        peft_model(input_ids=input_ids, attention_mask=state["mask"], adapter_names=adapter_names, **cache)

    forward(input_ids)

    def step():
        state["mask"] = torch.nn.functional.pad(state["mask"], (0, 1), value=1)
        forward(nxt)

    return step


def main(args):
    model = inference.load_model(args.model_name_or_path, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_adapters(model, tmp, 4, args.rank)
        argv = ["--port", str(free_port()), "--max_batch_size", "8", "--log_level", "warning"]
        argv += ["--served_model_name", "base", "--lora_modules", *[f"{n}={p}" for n, p in folders.items()]]
        setups = {
            "8 clients over 4 adapters": [f"lora{i % 4}" for i in range(8)],
            "8 clients on 1 adapter": ["lora0"] * 8,
            "8 clients on the base": ["base"] * 8,
        }
        rates = {label: [] for label in setups}
        with serve.ServerThread(serve.build_server(serve.parse_args(argv), model=model)) as running:
            clients_run(running.url, ["lora0", "base"], 1, 4)  # warm-up
            for r in range(args.rounds):
                for label, models in setups.items():
                    rates[label].append(clients_run(running.url, models, args.requests_per_client, args.max_tokens))
                    print(f"round {r + 1}: {label}: {rates[label][-1]:.1f} tokens/s", flush=True)
        times = step_times(model, model.adapters, 8, args.steps)  # the server stopped: the model is ours alone
    print(f"model: {model.name}; 4 adapters of rank {args.rank} on every linear layer; fp32 on CPU")
    print(f"{args.requests_per_client} requests per client, max_tokens {args.max_tokens}, {args.rounds} rounds")
    print("| set-up | tokens/s min | tokens/s median |\n|---|---|---|")
    for label, values in rates.items():
        print(f"| {label} | {min(values):.1f} | {statistics.median(values):.1f} |")
    print(f"| one decode step of 8 rows ({args.steps} each, taking turns) | ms min | ms median |\n|---|---|---|")
    for label, seconds in times.items():
        print(f"| {label} | {1000 * min(seconds):.1f} | {1000 * statistics.median(seconds):.1f} |")
    spread, one = (statistics.median(rates[k]) for k in list(setups)[:2])
    print(f"lora_spread_vs_one_adapter: {spread / one:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests_per_client", type=int, default=2)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="decode steps timed per way, in the step comparison")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
