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
BUDGET positions, and steps that are not the kernel's over fp32 weights (bf16 and int8 prefill keep their faster
paths, LoRA rows their own step), are prefilled apart as before (batch.DecodeBatch.admit).
"""

import torch

BUDGET = 256  # prompt positions per pass: bounds the pass's buffers and the running rows' wait for it


def usable(stepper):
    """True where the step can take prompts with its decode (llama_step.LlamaStep over fp32, with our kernel)."""
    return getattr(stepper, "fuses", False)


def groups(prompts):
    """(groups, apart): indices of the prompts that fit, in consecutive groups of at most BUDGET positions each;
    and the indices of those longer than BUDGET (prefilled apart)."""
    out, apart, total = [], [], BUDGET + 1
    for i, ids in enumerate(prompts):
        if len(ids) > BUDGET:
            apart.append(i)
            continue
        if total + len(ids) > BUDGET:
            out.append([])
            total = 0
        out[-1].append(i)
        total += len(ids)
    return out, apart


@torch.inference_mode()
def step(stepper, next_ids, prompts):
    """One pass: every running row (next_ids (rows,): its pending token, or None for no rows) takes one token, and
    each prompt (a list of ids) fills a new last row of the cache; (rows, vocab) logits for the running rows' next
    tokens and (prompts, vocab) for each prompt's first new one."""
    cache = stepper.cache
    lens = list(cache.lens)
    n = len(lens)
    pos, slots, want = list(lens), list(range(n)), list(range(n))
    for ids in prompts:
        row = cache.add_row(len(ids))
        pos += range(len(ids))
        slots += [row] * len(ids)
        want.append(len(pos) - 1)  # the prompt's last position: the only one whose logits are read
    cache.reserve(len(cache.lens), max(lens, default=0) + 1)
    tokens = [t for t in (next_ids,) if t is not None] + [torch.tensor(ids, dtype=torch.long) for ids in prompts]
    logits = stepper.kernel_step(torch.cat(tokens), pos, slots, want)
    cache.lens = [m + 1 for m in lens] + cache.lens[n:]
    return logits[:n], logits[n:]
