"""Batch-1 decode speed of each architecture family: our step (generation/llama_step.py, where it applies) against
transformers' forward (generation/hf_step.py, what every model decoded through before), in one run on one machine.

    python -m benchmarks.family_decode                     # every family, 8 of SmolLM2-135M's layers, fp32
    python -m benchmarks.family_decode --families qwen3 mistral --layers 30 --vocab 49152 --bf16   # its full shape

Every family gets a random model of the same shape: SmolLM2-135M's layers (hidden 576, 9 query and 3 key-value heads
of 64, MLP 1536), by default 8 of them over a vocabulary of 16384 (38M parameters, 150 MB in fp32). The same bytes
per token in every family, so the rates compare across families. `llama` is the plain layout, `llama3` takes Llama
3.1's rope (llama3 scaling); Mistral and Gemma keep their sliding windows (4096 by default: the 32-token prompt and
the decoded tokens stay inside them). Gemma has no fast step (it keeps transformers' forward); its rows measure that
forward twice, so their ratio shows the noise of the run.

Rate: greedy from the same 32-token prompt, decode steps only (prefill left out): --tokens steps / their time. Each
family's two steps alternate --repeat times (the best and the median kept, as llama-bench keeps the minimum and the
median time), since this machine's speed moves within minutes. Each run also checks that both steps chose the same
tokens. Last line: the headline.
"""

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alpaca_trainml.generation.hf_step import HFStep
from alpaca_trainml.generation.llama_step import LlamaStep, supports

SHAPE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536)
SHAPE.update(max_position_embeddings=8192, tie_word_embeddings=True, pad_token_id=None)
SHAPE.update(bos_token_id=None, eos_token_id=None)  # the defaults (Phi3's 32000...) can lie past --vocab
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
FAMILIES = {  # family -> (model_type, what differs from SHAPE)
    "llama": ("llama", {}),
    "llama3": (
        "llama",
        dict(rope_parameters=dict(LLAMA3_ROPE, original_max_position_embeddings=8192), max_position_embeddings=131072),
    ),
    "mistral": ("mistral", dict(sliding_window=4096)),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3": ("qwen3", {}),  # per-head q/k norms
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3_text", {}),
    "phi3": ("phi3", {}),  # q/k/v and gate/up fused in the checkpoint
}
PROMPT_LEN = 32


def build(family, dtype, layers, vocab):
    model_type, extra = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **SHAPE | dict(num_hidden_layers=layers, vocab_size=vocab) | extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def decode_rate(step, prompt, tokens):
    """(tokens/s over `tokens` greedy decode steps after the prompt's prefill, the tokens chosen)."""
    ids = step.prefill([prompt]).argmax(-1)
    chosen = [ids.item()]
    start = time.perf_counter()
    for _ in range(tokens):
        ids = step.decode(ids).argmax(-1)
        chosen.append(ids.item())
    rate = tokens / (time.perf_counter() - start)
    step.keep([])
    return rate, chosen


def measure(family, args, dtype):
    """{step name: [tokens/s per repeat]}, and whether the two steps chose the same tokens every time."""
    model = build(family, dtype, args.layers, args.vocab)
    fast = supports(model)
    steps = {"ours": (LlamaStep(model) if fast else HFStep(model, 0)), "transformers": HFStep(model, 0)}
    prompt = torch.randint(3, args.vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    rates, same = {name: [] for name in steps}, True
    decode_rate(steps["ours"], prompt, 2)  # warm-up: first calls allocate
    decode_rate(steps["transformers"], prompt, 2)
    for i in range(args.repeat):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        tokens = {}
        for name in order:
            rate, tokens[name] = decode_rate(steps[name], prompt, args.tokens)
            rates[name].append(rate)
        same &= tokens["ours"] == tokens["transformers"]
    return fast, rates, same


def main(args):
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if args.bf16 else [])
    rows = []
    for family in args.families:
        for dname, dtype in dtypes:
            fast, rates, same = measure(family, args, dtype)
            ours, theirs = statistics.median(rates["ours"]), statistics.median(rates["transformers"])
            rows.append((family, dname, fast, max(rates["ours"]), ours, max(rates["transformers"]), theirs, same))
            print(f"measured: {family} {dname}: ours {ours:.1f}, transformers {theirs:.1f} tok/s", flush=True)
    params = sum(p.numel() for p in build("llama", torch.float32, args.layers, args.vocab).parameters())
    threads = torch.get_num_threads()
    print(f"{params / 1e6:.0f}M parameters each; {threads} threads; {args.tokens} tokens x {args.repeat} runs")
    print(f"{'family':8s} {'dtype':5s} {'step':20s} {'ours best/med':>13s} {'theirs best/med':>15s} {'ratio':>6s} same")
    for family, dname, fast, obest, omed, tbest, tmed, same in rows:
        step = "ours (Llama step)" if fast else "transformers' fwd"
        print(
            f"{family:8s} {dname:5s} {step:20s} {obest:6.1f}/{omed:6.1f} {tbest:7.1f}/{tmed:7.1f} "
            f"{omed / tmed:5.2f}x {'yes' if same else 'NO'}"
        )
    fast_rows = [omed / tmed for _, d, fast, _, omed, _, tmed, _ in rows if fast and d == "fp32"]
    slow = sorted({family for family, _, fast, *_ in rows if not fast})
    headline = f"{statistics.median(fast_rows):.2f}x transformers' forward (median over fp32 fast families)"
    print(f"family_decode: our step {headline}; on transformers' forward: {', '.join(slow) or 'none'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8; SmolLM2-135M has 30)")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary (default 16384; SmolLM2-135M's is 49152)")
    p.add_argument("--tokens", type=int, default=64, help="greedy decode steps per run (default 64)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each step, alternating (default 3)")
    p.add_argument("--bf16", action="store_true", help="also measure bf16 models")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
