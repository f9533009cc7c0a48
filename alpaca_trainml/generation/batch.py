"""The decoder core, used by InstructModel.generate (one call, run to the end) and by the serving Engine (rows join
and leave between steps): the running rows, their sampling, their stop handling and the stream hold-back, over a
model step (llama_step.LlamaStep where it applies, else hf_step.HFStep)."""

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from alpaca_trainml.generation import fused
from alpaca_trainml.generation.chunked import Filling
from alpaca_trainml.generation.decoding import Completion, GenParams, cut_at_stop, probabilities, stop_holdback
from alpaca_trainml.generation.hf_step import HFStep
from alpaca_trainml.generation.llama_step import LlamaStep, supports
from alpaca_trainml.generation.lora_step import LoraStep
from alpaca_trainml.generation.prefix_cache import DEFAULT_MB, PrefixCache
from alpaca_trainml.generation.speculative import accept_rows, step_drafts
from alpaca_trainml.generation.structured import UnwritableError, constrain

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    ids: list  # prompt token ids
    params: GenParams
    on_text: Callable | None = None  # for streams: called from the model thread with each new piece of text
    cancel: threading.Event = field(default_factory=threading.Event)  # set when the caller leaves
    future: Future = field(default_factory=Future)  # the Completion
    submitted: float = field(default_factory=time.perf_counter)  # for serve.py's /metrics (generation/metrics.py)
    token_times: list = field(default_factory=list)  # perf_counter() as each token was sampled
    grammar: object = None  # a structured.Matcher: the row samples only tokens its grammar takes (response_format)
    adapter: object = None  # a lora_adapters.LoraAdapter of the server's, or None for the base
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache (prefix_cache.py)


def sample(logits, temperature, top_p):
    """One token per row of logits (batch, vocab), each row with its own temperature (0 = greedy) and top_p; only
    the sampled rows pay for their distribution (softmax, nucleus, draw over the vocabulary)."""
    picked = logits.argmax(-1)
    drawn = (temperature != 0).nonzero().squeeze(-1)
    if len(drawn):
        rows = logits[drawn].float()
        picked[drawn] = draw(probabilities(rows, temperature[drawn], top_p[drawn]))
    return picked


def draw(weights):
    """One index per row of weights (rows, n), each drawn with probability proportional to its weight (as
    torch.multinomial draws one), by inverting the cumulative sum: multinomial took 37 ms a step for 8 rows of a
    49152-token vocabulary on a loaded 2-core CPU, where this takes under 1 ms."""
    total = weights.cumsum(-1)
    below = torch.nextafter(total[:, -1:], torch.zeros(()))  # u stays under the total: never past the last token
    u = torch.minimum(torch.rand(len(weights), 1, device=weights.device) * total[:, -1:], below)
    return torch.searchsorted(total, u, right=True).squeeze(-1)  # the first token whose cumulative weight passes u


def sample_rows(rows, logits):
    """The next token of each row; an all-greedy batch (the common case in evaluation) is one argmax."""
    settings = [(float(r.job.params.temperature), float(r.job.params.top_p)) for r in rows]
    if all(t == 0 for t, _ in settings):
        return logits.argmax(-1)
    temperature, top_p = torch.tensor(settings, device=logits.device).unbind(-1)
    return sample(logits, temperature, top_p)


def fail(job, error):
    """End a job, running or still waiting, with `error` (unless it has ended already)."""
    future = job.future
    if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
        future.set_exception(error)


def fill_holes(n, leaving):
    """The rows of n that stay, in their new order: those that leave make holes, and the last rows move into them
    (the cache then copies one row per hole, not every row after the first hole)."""
    gone = set(leaving)
    m = n - len(gone)
    keep = list(range(m))
    tail = [i for i in range(m, n) if i not in gone]
    for hole, row in zip([i for i in range(m) if i in gone], tail):
        keep[hole] = row
    return keep


class Row:
    """A job in the running batch: the tokens it has made (end-of-text excluded), how much text its stream has had,
    and the rules that end it: end of text, a stop string, max_tokens, the context window."""

    def __init__(self, job, decode, eos, context_window):
        self.job, self.decode, self.eos, self.context_window = job, decode, eos, context_window
        self.ids, self.made, self.sent = [], 0, 0  # made counts end-of-text too, as usage does

    def add(self, token):
        """Append one token; True when the row has ended (and its caller has the Completion)."""
        params = self.job.params
        self.job.token_times.append(time.perf_counter())
        self.made += 1
        grammar = self.job.grammar
        if token in self.eos:
            if grammar is not None and not grammar.accepting():  # constrain() let a stuck row only end
                return self.unwritable()
            return self.finish("stop")
        self.ids.append(token)
        if grammar is not None and not grammar.consume(token):  # a stuck row without an end-of-text token
            return self.unwritable()
        if params.stop or self.job.on_text:
            text, stopped = cut_at_stop(self.decode(self.ids), params.stop)
            if stopped:
                return self.finish("stop")
            end = len(text) - stop_holdback(text, params.stop)  # text that may still become a stop string waits
            if text.endswith("\ufffd"):  # half a UTF-8 character waits for its other half
                end = min(end, len(text) - 1)
            self._send(text[:end])
        if grammar is not None and grammar.complete():  # the JSON has ended: no end-of-text step needed
            return self.finish("stop")
        if self.made >= params.max_tokens or len(self.job.ids) + self.made >= self.context_window:
            return self.finish("length")
        return False

    def finish(self, reason):
        text = cut_at_stop(self.decode(self.ids), self.job.params.stop)[0]
        self._send(text)
        self.job.future.set_result(Completion(text, len(self.job.ids), self.made, reason, self.job.cached))
        return True

    def fail(self, error):
        fail(self.job, error)

    def unwritable(self):
        """The row's grammar took no token the model could write: the answer fails (never incomplete JSON that says
        it stopped); the batch goes on."""
        self.fail(UnwritableError("the model's tokenizer cannot write JSON under this response_format here"))
        return True

    def _send(self, upto):
        if self.job.on_text is not None and len(upto) > self.sent:
            try:
                self.job.on_text(upto[self.sent :])
            except Exception:  # a broken listener ends its own request, not the batch
                logger.exception("on_text failed; the request is cancelled")
                self.job.cancel.set()
            self.sent = len(upto)


class DecodeBatch:
    """The running rows over one model step. admit() prefills jobs into the batch, step() decodes one token for
    every row; rows that end leave at once. Each forward holds the model's lock (one forward at a time)."""

    def __init__(self, model):
        self.model = model  # an InstructModel
        step = LoraStep if getattr(model, "adapters", None) is not None else LlamaStep  # --lora_modules: per row
        self.stepper = step(model.model) if supports(model.model) else HFStep(model.model, model.pad_id)
        # prompt-lookup speculation (speculative.py) where the step verifies a draft exactly: fp32 on our Llama step
        self.lookup = getattr(model, "speculative", None) if getattr(self.stepper, "verifies", False) else None
        self.drafted = self.accepted = 0  # draft tokens checked and kept, for the acceptance rate
        self.eos, self.eos_ids = frozenset(model.eos_ids), list(model.eos_ids)
        budget = getattr(model, "prefix_cache_mb", DEFAULT_MB) * 2**20  # prompts' keys and values kept for reuse
        self.prefixes = PrefixCache(budget) if budget > 0 and fused.usable(self.stepper) else None
        self.rows, self.next_ids = [], None  # next_ids (rows,): each row's sampled, not yet fed token
        self.filling = []  # chunked.Filling: long prompts on their way in, the first one a chunk each step

    def admit(self, jobs):
        """Prefill jobs into the batch. Where the step can (fused.py), their prompts go in with the running rows'
        next decode step, in passes of up to fused.BUDGET prompt positions: each pass also decodes one token of every
        running row. Longer prompts go in a chunk per step (chunked.py); other steps prefill apart, at once. On an
        error every job not in the batch yet fails with it too (the caller ends those in the batch)."""
        try:
            self._admit(jobs)
        except Exception as e:
            for job in jobs:
                fail(job, e)
            raise

    def _admit(self, jobs):
        if not fused.usable(self.stepper) or any(j.adapter for j in jobs):
            return self._prefill(jobs)
        found = [self.prefixes.match(j.ids) if self.prefixes else (0, None) for j in jobs]
        passes, apart = fused.groups([j.ids for j in jobs], [n for n, _ in found], fused.budget(self.stepper))
        if fused.int8_kernel(self.stepper) and apart:  # a long int8 prompt prefills faster apart (fused.INT8_BUDGET)
            self._prefill([jobs[i] for i in apart])
        else:
            self.filling += [Filling(jobs[i], self.stepper, self.prefixes) for i in apart]
        for group in passes:
            self._fused([jobs[i] for i in group])
        self._settle()

    def _fused(self, jobs):
        new = [Row(j, self.model.decode, self.eos, self.model.context_window) for j in jobs]
        prompts = [j.ids for j in jobs]
        found = [self.prefixes.match(ids) for ids in prompts] if self.prefixes else None  # and the passes' before
        for job, (n, _) in zip(jobs, found or []):
            job.cached = n
        try:
            with self.model.lock:
                old_logits, logits = fused.step(self.stepper, self.next_ids, prompts, self.prefixes, found)
        finally:
            self.rows += new  # on an error the new callers get it too (end())
        old = self.rows[: len(self.rows) - len(new)]
        ids = sample_rows(new, constrain(new, logits, self.eos_ids))
        if old:
            ids = torch.cat([sample_rows(old, constrain(old, old_logits, self.eos_ids)), ids])
        self.next_ids = ids
        self._emit(self.rows, 0)

    def _prefill(self, jobs):
        new = [Row(j, self.model.decode, self.eos, self.model.context_window) for j in jobs]
        try:
            adapters = [j.adapter for j in jobs]
            with self.model.lock:
                prompts = [j.ids for j in jobs]
                logits = self.stepper.prefill(prompts, adapters) if any(adapters) else self.stepper.prefill(prompts)
        finally:
            self.rows += new  # on an error the new callers get it too (end())
        self._join(new, logits)

    def _join(self, new, logits):
        """The first tokens of the rows just added at the end of the batch, from their prompts' logits."""
        ids = sample_rows(new, constrain(new, logits, self.eos_ids))
        self.next_ids = ids if self.next_ids is None else torch.cat([self.next_ids, ids])
        self._emit(new, len(self.rows) - len(new))

    def _fill(self):
        """The next chunk of the first long prompt; after its last one, it joins the batch as a new row."""
        filling = self.filling[0]
        with self.model.lock:
            logits = filling.advance(self.stepper)
            if logits is None:
                return
            row = filling.join(self.stepper.cache)
        self.filling.pop(0)
        if self.prefixes is not None:
            self.prefixes.store(self.stepper.cache, row, filling.job.ids)
        self.rows.append(Row(filling.job, self.model.decode, self.eos, self.model.context_window))
        self._join(self.rows[-1:], logits)

    def step(self):
        """One token for every running row (several with a draft verified), after a chunk of a long prompt."""
        if self.filling:
            self._fill()
        if self.rows:
            self._decode()
        self._settle()

    def _settle(self):
        """Long prompts with no running row beside them fill at once: nothing waits for them. So a batch with a
        prompt still filling always has a running row (its callers loop `while batch.rows`)."""
        while self.filling and not self.rows:
            self._fill()

    def _decode(self):
        drafts = step_drafts(self.rows, self.lookup) if self.lookup else None
        if drafts and any(drafts):
            return self._verify(drafts)
        with self.model.lock:
            logits = self.stepper.decode(self.next_ids)
        self.next_ids = sample_rows(self.rows, constrain(self.rows, logits, self.eos_ids))
        self._emit(self.rows, 0)

    def _verify(self, drafts):
        """One step that checks every row's draft at once (rows without one check just their pending token); each
        row keeps what accept_rows gives it, 1 to len(draft) + 1 tokens, and the cache forgets the rest."""
        s = 1 + max(map(len, drafts))
        pending = self.next_ids.tolist()
        tokens = [[p, *d] + [p] * (s - 1 - len(d)) for p, d in zip(pending, drafts)]  # short drafts padded, unread
        with self.model.lock:
            counts = [1 + len(d) for d in drafts]
            logits = self.stepper.verify(torch.tensor(tokens, device=self.next_ids.device), counts)
        if any(r.job.grammar is not None for r in self.rows):  # constrained rows drafted nothing: mask position 0
            first = constrain(self.rows, torch.stack([row[0] for row in logits]), self.eos_ids)
            logits = [torch.cat([f[None], row[1:]]) for f, row in zip(first, logits)]
        made = accept_rows(self.rows, logits, drafts)
        self.stepper.rewind([s - len(m) for m in made])  # each row fed its pending token and len(m) - 1 of its draft
        self.drafted += sum(map(len, drafts))
        self.accepted += sum(len(m) - 1 for m in made)
        self.next_ids = torch.tensor([m[-1] for m in made], device=self.next_ids.device)
        self.drop([r for r, m in zip(self.rows, made) if any(r.add(t) for t in m)])  # any(): up to the end token

    def jobs(self):
        """Every job in the batch: the running rows', then the long prompts' still filling."""
        return [r.job for r in self.rows] + [f.job for f in self.filling]

    def drop_filling(self, leaving):
        """Take long prompts that are still filling out (their callers are told apart)."""
        self.filling = [f for f in self.filling if f.job not in leaving]

    def drop(self, leaving):
        """Take rows out of the batch (their callers are told apart)."""
        gone = {id(r) for r in leaving}
        keep = fill_holes(len(self.rows), [i for i, r in enumerate(self.rows) if id(r) in gone])
        if len(keep) < len(self.rows):
            self.stepper.keep(keep)
            self.rows = [self.rows[i] for i in keep]
            self.next_ids = self.next_ids[keep] if keep else None

    def end(self, error):
        """Every row and long prompt on its way in fails with `error`; the batch is empty after."""
        for job in self.jobs():
            fail(job, error)
        self.rows, self.next_ids, self.filling = [], None, []
        self.stepper.keep([])

    def _emit(self, rows, offset):
        """Give each row its sampled token; finished rows leave the batch."""
        tokens = self.next_ids[offset : offset + len(rows)].tolist()
        self.drop([r for r, t in zip(rows, tokens) if r.add(t)])


def run_to_end(model, jobs, cancel=None):
    """Decode jobs together until every one has ended (InstructModel.generate); with `cancel` set, the rows still
    running end with the text they have."""
    batch = DecodeBatch(model)
    batch.admit(jobs)
    while batch.rows:
        if cancel is not None and cancel.is_set():
            for row in batch.rows + [Row(f.job, model.decode, batch.eos, 0) for f in batch.filling]:
                row.finish("stop")
            break
        batch.step()
    return [j.future.result() for j in jobs]
