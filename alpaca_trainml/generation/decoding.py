"""Decoding settings and their limits (the ranges live in limits.py), and stop strings: the rules InstructModel
(model.py) and the serving engine (engine.py) share, so a request means the same on every path."""

from dataclasses import dataclass, field

import torch
import transformers

from alpaca_trainml.generation.limits import MAX_BEAMS, MAX_STOPS, MAX_TEMPERATURE, temperature_ok, top_p_ok

NUCLEUS_FIRST = 256  # top_p: the likeliest tokens looked at before sorting a whole row
MIN_TEMPERATURE = 1e-5  # a smaller one above 0 samples as this: 1e-300 overflows the logits to inf (a 500 once)


@dataclass(frozen=True)
class GenParams:
    """Decoding settings. max_tokens counts new tokens only (the fork's max_length also counted the prompt)."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 0.75  # the fork's defaults for temperature, top_p and num_beams
    num_beams: int = 1
    stop: tuple = ()  # strings that end the answer; not included in it

    def batch_key(self):
        """Requests with equal keys can share one generate() call (max_tokens may differ)."""
        return (self.temperature, self.top_p, self.num_beams, self.stop)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string) or "length" (ran into max_tokens)
    # prompt tokens whose keys and values came from the prefix cache (prefix_cache.py): not part of the answer itself
    cached_tokens: int = field(default=0, compare=False)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def check_params(params, max_tokens_limit):
    """Raise ValueError listing every out-of-range setting; the message says the allowed range."""
    p, problems = params, []
    if not _is_int(p.max_tokens) or not 1 <= p.max_tokens <= max_tokens_limit:
        problems.append(
            f"max_tokens must be an integer from 1 to {max_tokens_limit} (new tokens), got {p.max_tokens!r}"
        )
    if not temperature_ok(p.temperature):
        problems.append(f"temperature must be a number from 0 to {MAX_TEMPERATURE} (0 = greedy), got {p.temperature!r}")
    if not top_p_ok(p.top_p):
        problems.append(f"top_p must be a number above 0 and at most 1, got {p.top_p!r}")
    if not _is_int(p.num_beams) or not 1 <= p.num_beams <= MAX_BEAMS:
        problems.append(f"num_beams must be an integer from 1 to {MAX_BEAMS}, got {p.num_beams!r}")
    if len(p.stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in p.stop):
        problems.append(f"stop must be at most {MAX_STOPS} non-empty strings, got {list(p.stop)!r}")
    if problems:
        raise ValueError("; ".join(problems))


def generation_limits(max_tokens_limit):
    """The defaults and ranges check_params enforces, for clients to show (serve.py's /health, the web page)."""
    d = GenParams()
    return dict(
        max_tokens=dict(default=d.max_tokens, min=1, max=max_tokens_limit),
        temperature=dict(default=d.temperature, min=0, max=MAX_TEMPERATURE),
        top_p=dict(default=d.top_p, min_exclusive=0, max=1),
        num_beams=dict(default=d.num_beams, min=1, max=MAX_BEAMS),
        max_stops=MAX_STOPS,
    )


def generation_kwargs(params):
    """Arguments for model.generate(): sampling unless temperature is 0, beam search when num_beams > 1."""
    if params.temperature == 0:
        return dict(do_sample=False, num_beams=params.num_beams, temperature=None, top_p=None, top_k=None)
    return dict(
        do_sample=True,
        num_beams=params.num_beams,
        temperature=max(float(params.temperature), MIN_TEMPERATURE),
        top_p=float(params.top_p),
        top_k=None,
    )  # float(): transformers refuses an int temperature; top_k off: the fork and OpenAI sample with top_p alone


def probabilities(logits, temperature, top_p):
    """(batch, vocab) the distribution each row samples from, with its own temperature and top_p: the smallest set
    of likeliest tokens whose probability reaches top_p, as transformers' TopPLogitsWarper (unnormalised: multinomial
    takes weights). Rows with temperature 0 are left to the caller (greedy: the argmax)."""
    probs = torch.softmax(logits.float() / temperature.clamp(min=MIN_TEMPERATURE)[:, None], dim=-1)
    nucleus = ((top_p < 1) & (temperature > 0)).nonzero().squeeze(-1)  # sorting the vocabulary costs: only these
    if len(nucleus):
        # the likeliest NUCLEUS_FIRST tokens first (topk: some 50x cheaper than sorting 49152 on a CPU, where the
        # sort cost 100 ms a step for 8 rows); a row whose nucleus reaches past them is sorted in full
        top, order = probs[nucleus].topk(min(NUCLEUS_FIRST, probs.shape[-1]), dim=-1)
        wide = top.sum(-1) < top_p[nucleus]
        if wide.any():
            rows = nucleus[wide]
            _keep_nucleus(probs, probs[rows].sort(dim=-1, descending=True), top_p, rows)
            nucleus, top, order = nucleus[~wide], top[~wide], order[~wide]
        _keep_nucleus(probs, (top, order), top_p, nucleus)
    return probs


def _keep_nucleus(probs, ranked, top_p, rows):
    """Zero each of `rows` outside its nucleus, in place; ranked: (probabilities, token ids) of its likeliest tokens,
    likeliest first, reaching at least top_p of its mass."""
    ranked_probs, order = ranked
    if not len(rows):
        return
    before = ranked_probs.cumsum(-1) - ranked_probs  # mass of the likelier tokens
    cut = before >= top_p[rows, None]
    cut[:, 0] = False  # the likeliest always stays, even for a top_p that is 0 in float32 (5e-324)
    probs[rows] = torch.zeros_like(probs[rows]).scatter(-1, order, ranked_probs.masked_fill(cut, 0.0))


def cut_at_stop(text, stops):
    """(text before the earliest stop string, whether one was found)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def stop_holdback(text, stops):
    """How many trailing characters of text could still grow into a stop string; a stream must not send them yet."""
    return max(
        (k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:])), default=0
    )


class StopCriteria(transformers.StoppingCriteria):
    """Ends each row once its new text holds a stop string, and every row once `cancel` is set."""

    def __init__(self, decode, prompt_len, stops, cancel):
        self.decode, self.prompt_len, self.stops, self.cancel = decode, prompt_len, stops, cancel

    def __call__(self, input_ids, scores, **kwargs):
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done = [
            cut_at_stop(self.decode(row[self.prompt_len :]), self.stops)[1] if self.stops else False
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
