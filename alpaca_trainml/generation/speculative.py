"""Speculative decoding by prompt lookup: more than one token per read of the weights, with no draft model.

A decode step reads every weight once for one token, so it is bound by the memory bandwidth. When the answer copies
from its prompt (a summary, an extraction, an edit of a given text), the tokens that follow are often the ones that
followed the same few tokens earlier. draft() takes them from the prompt and the text so far; the model checks the
whole draft in one step (LlamaStep.verify: k positions, one pass over the weights), and the row keeps the longest
prefix the model agrees with, then one token of the model's own. So each step makes 1 to k + 1 tokens.

Nothing changes what is generated:
- greedy: a drafted token is kept only when it is the model's argmax at its position, and the first one that is not
  is replaced by that argmax. The tokens are those of plain decoding (tests/test_speculative.py), up to the last
  bits of the sums (the verify pass and the one-token kernel add in different orders);
- sampling: the standard acceptance rule (Leviathan et al. 2023; Chen et al. 2023) with a draft that is one token
  for sure (q = 1 at the drafted token t): keep t with probability p(t), else sample from p without t,
  renormalised, and stop. Each token is then distributed exactly as p, the model's distribution after temperature
  and top_p.
"""

from array import array
from dataclasses import dataclass

import torch

from alpaca_trainml.generation.decoding import probabilities

MODES = ("none", "ngram")  # --speculative on serve.py, inference.py and evaluate.py
SPECULATIVE_HELP = (
    "ngram: speculative decoding by prompt lookup (drafts from the prompt and the text so far, checked in one model "
    "step: the same greedy text, faster when the answer copies from its input); none: plain decoding"
)


@dataclass(frozen=True)
class Lookup:
    """Prompt-lookup settings: a draft follows the latest earlier occurrence of the longest n-gram (max_ngram down to
    min_ngram tokens) that ends the text; a match of n tokens drafts lengths[n - 1] tokens (the last entry for longer
    ones), at most `tokens`; a verify step carries at most `positions` positions over all its rows (each row's pending
    token and draft).

    Why lengths by match: a longer match is a surer copy. On benchmarks/grounded_prompts.json (64 greedy tokens,
    benchmarks/draft_replay.py), the first drafted token was kept after 80-88% of the 3-token matches, 47-53% of the
    2-token ones and 24-28% of the 1-token ones; two thirds of the steps found no match of 2 or more. A one-row step
    is bound by reading the weights, so a short draft from a weak match costs little (a verify of 2 positions cost
    1.07 plain steps, of 8 about 1.5, on the kernel's AVX-512 matmul, one loaded thread: benchmarks/verify_cost.py),
    and a long one is worth it only where the copy is likely.

    Why a budget: a step of many rows is bound by the cores' compute instead, and there a drafted token costs nearly a
    token's full compute while being kept half the time or less. 16 positions in all leave each of up to 8 rows
    16 // rows - 1 drafted tokens (at most `tokens`): two rows 7, four rows 3 each, eight 1 each; nine rows or more
    decode plainly. A match shorter than 2 tokens drafts only where the budget leaves a row its full `tokens` (a lone
    row): kept a quarter of the time, it pays only where extra positions are nearly free."""

    tokens: int = 8  # lengths (1, 4, 8) from matches of 1 to 3: 1.86 and 1.89 tokens per step on the two sets, where
    max_ngram: int = 3  # 4 tokens from matches of 2 or 3 (the setting before) gave 1.66 and 1.70 (RESULTS.md)
    min_ngram: int = 1
    positions: int = 16
    lengths: tuple = (1, 4, 8)  # tokens drafted after a match of 1, 2, 3 (or more) tokens


def lookup_for(mode):
    """The Lookup for a --speculative value ('none': None, plain decoding)."""
    if mode not in MODES:
        raise ValueError(f"speculative must be one of {', '.join(MODES)}, got {mode!r}")
    return Lookup() if mode == "ngram" else None


def draft(context, k, max_ngram=3, min_ngram=1, lengths=None):
    """Up to k token ids that followed the latest earlier occurrence of the context's last n tokens (n from max_ngram
    down to min_ngram); [] when none occurs. context: the prompt's ids and those generated so far. lengths: a match of
    n tokens takes at most lengths[n - 1] of them (the last entry for longer matches); None: k whatever the match."""
    if k <= 0 or len(context) < 2:
        return []
    data = array("i", context).tobytes()  # bytes.rfind finds a run of ids at C speed; 4 bytes per id
    end = 4 * (len(context) - 1)  # an occurrence ends before the last id, so at least one id follows it
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        pattern, stop = data[-4 * n :], end
        take = k if lengths is None else min(k, lengths[min(n, len(lengths)) - 1])
        while (at := data.rfind(pattern, 0, stop)) >= 0:
            if at % 4 == 0:  # a match on id boundaries (not across the bytes of two ids)
                return list(context[at // 4 + n : at // 4 + n + take])
            stop = at + len(pattern) - 1
    return []


def accept_greedy(logits, drafted):
    """logits (len(drafted) + 1, vocab): the model's at the row's pending token and at each drafted one. The new
    tokens: the drafted prefix that equals the model's argmax, then the argmax after it."""
    best = logits.argmax(-1).tolist()
    n = 0
    while n < len(drafted) and drafted[n] == best[n]:
        n += 1
    return [*drafted[:n], best[n]]


def accept_sampled(probs, drafted, generator=None):
    """probs (len(drafted) + 1, vocab): the model's distribution at each position. Keep drafted token t with
    probability p(t); at the first one rejected, sample from p with t removed (renormalised) and stop; when all are
    kept, sample one more from the last position."""
    u = torch.rand(len(drafted), generator=generator).tolist()
    for j, t in enumerate(drafted):
        p = probs[j]
        if u[j] < float(p[t]):
            continue
        rest = p.clone()
        rest[t] = 0.0
        return [*drafted[:j], int(torch.multinomial(rest / rest.sum(), 1, generator=generator))]
    return [*drafted, int(torch.multinomial(probs[len(drafted)], 1, generator=generator))]


def row_draft(row, lookup, room):
    """A row's draft of at most `room` tokens, no longer than the tokens it may still make minus the model's own one
    (max_tokens and the context window end the row mid-draft otherwise, and the rest would be wasted work). A row
    under a grammar (structured.py) drafts nothing: checking a draft against the grammar would need a mask at each of
    its positions. Where the step's budget leaves less than lookup.tokens (several rows), matches shorter than 2
    tokens draft nothing (Lookup)."""
    if row.job.grammar is not None:
        return []
    made, prompt = row.made, len(row.job.ids)
    left = min(row.job.params.max_tokens - made, row.context_window - prompt - made) - 1
    shortest = lookup.min_ngram if room >= lookup.tokens else max(lookup.min_ngram, 2)
    return draft(row.job.ids + row.ids, min(room, left), lookup.max_ngram, shortest, lookup.lengths)


def step_drafts(rows, lookup):
    """Each row's draft for the next step, within the step's budget of lookup.positions positions; None when the
    budget leaves no room for drafts (the batch decodes plainly)."""
    room = min(lookup.tokens, lookup.positions // max(len(rows), 1) - 1)
    return [row_draft(r, lookup, room) for r in rows] if room > 0 else None


def accept_rows(rows, logits, drafts):
    """Each row's new tokens from its verify logits (rows, s, vocab), by its own temperature and top_p."""
    out = []
    for row, row_logits, drafted in zip(rows, logits, drafts):
        mine = row_logits[: len(drafted) + 1].float()
        temperature, top_p = float(row.job.params.temperature), float(row.job.params.top_p)
        if temperature == 0:
            out.append(accept_greedy(mine, drafted))
        else:
            settings = torch.tensor([[temperature, top_p]] * len(mine)).unbind(-1)
            probs = probabilities(mine, *settings)
            out.append(accept_sampled(probs / probs.sum(-1, keepdim=True), drafted))  # top_p left them unnormalised
    return out
