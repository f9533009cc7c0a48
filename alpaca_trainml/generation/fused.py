"""New prompts prefilled in the same pass over the weights as the running rows' decode step.

Why: a decode step of a few rows reads every weight once and leaves the cores idle between loads, and a prompt's
prefill is compute: run apart, the batch waits for each new prompt's forward, then pays another read of the weights
for its own step. Here one call of our kernel's decoder (csrc/decode.cpp) takes every running row's pending token
at its position, and every position of the new prompts, each prompt in its own new cache row (the kernel attends
within a row up to each position, as a speculative verify's draft does); only the rows that need logits pay the
lm_head (the running rows and each prompt's last position). With serve.py's mix at 8 clients (30-60-token prompts,
32-token answers) the prompts are more positions than the answers.

A row's numbers do not depend on the rows beside it (the kernel sums each output in one order whatever the rows:
csrc/decode.cpp, csrc/f32.cpp), so a prompt prefilled here gives the same tokens alone or joining a full batch, and
a running row's token is the one a plain decode step gives, bit for bit (tests/test_fused.py). Prompts of more than
BUDGET new positions go in a chunk per step (chunked.py). Over int8 weights (--dtype int8) prompts of up to
INT8_BUDGET new positions fuse and longer ones prefill apart; bf16 prefill keeps its faster path (AMX where the CPU
has it) and LoRA rows their own step: they prefill apart, as before (batch.DecodeBatch.admit).
"""

import torch

BUDGET = 256  # prompt positions per pass: bounds the pass's buffers and the running rows' wait for it
# int8 weights: the kernel's product of many rows runs behind MKL's over the dequantized weight (prefill apart):
# about even at 40 positions, 1.9x slower at 120, 2.3x at 250 (SmolLM2-135M, 2 threads, 2026-12-06). So only
# prompts of up to this many new positions fuse; longer ones prefill apart, at once.
INT8_BUDGET = 48


def usable(stepper):
    """True where the step can take prompts with its decode: llama_step.LlamaStep over fp32 weights, or int8 ones,
    with our kernel."""
    return getattr(stepper, "fuses", False) or int8_kernel(stepper)


def int8_kernel(stepper):
    """True for our kernel's step over int8 weights (--dtype int8)."""
    layers = getattr(stepper, "layers", None)
    return getattr(stepper, "decoder", None) is not None and bool(layers) and layers[0].qkv.full.dtype == torch.uint8


def budget(stepper):
    """New prompt positions per pass, and the most a prompt may have to fuse."""
    return INT8_BUDGET if int8_kernel(stepper) else BUDGET


def groups(prompts, starts=None, limit=None):
    """(groups, apart): indices of the prompts that fit, in consecutive groups of at most `limit` (default BUDGET)
    new positions each (a prompt's positions from its start: those before it come from the prefix cache); and the
    indices of those longer than that (chunked.py cuts them, or they prefill apart)."""
    limit = limit or BUDGET
    out, apart, total = [], [], limit + 1
    for i, ids in enumerate(prompts):
        size = len(ids) - (starts[i] if starts else 0)
        if size > limit:
            apart.append(i)
            continue
        if total + size > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += size
    return out, apart


@torch.inference_mode()
def step(stepper, next_ids, prompts, prefixes=None, found=None):
    """One pass: every running row (next_ids (rows,): its pending token, or None for no rows) takes one token, and
    each prompt (a list of ids) fills a new last row of the cache; (rows, vocab) logits for the running rows' next
    tokens and (prompts, vocab) for each prompt's first new one. prefixes: a prefix_cache.PrefixCache, with found:
    each prompt's (n, key) from its match(); the prompt's first n positions are copied from it, not computed, and
    every prompt is kept in it after the pass."""
    cache = stepper.cache
    lens = list(cache.lens)
    n = len(lens)
    found = found or [(0, None)] * len(prompts)
    rows = [cache.add_row(len(ids)) for ids in prompts]
    cache.reserve(len(cache.lens), max(lens, default=0) + 1)
    pos, slots, want = list(lens), list(range(n)), list(range(n))
    for ids, row, (start, key) in zip(prompts, rows, found):
        if start:
            prefixes.load(cache, row, key, start)
        pos += range(start, len(ids))
        slots += [row] * (len(ids) - start)
        want.append(len(pos) - 1)  # the prompt's last position: the only one whose logits are read
    tokens = [t for t in (next_ids,) if t is not None]
    tokens += [torch.tensor(ids[start:], dtype=torch.long) for ids, (start, _) in zip(prompts, found)]
    logits = stepper.kernel_step(torch.cat(tokens), pos, slots, want)
    cache.lens = [m + 1 for m in lens] + cache.lens[n:]
    if prefixes is not None:
        for ids, row in zip(prompts, rows):
            prefixes.store(cache, row, ids)
    return logits[:n], logits[n:]
