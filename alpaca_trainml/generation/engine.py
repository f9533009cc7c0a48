"""Continuous batching for serve.py: one model thread decodes every running request one token per step.

A request joins the running batch at the next step (its prompt is prefilled, then its key/value cache is merged
into the batch's), and leaves when it ends: end of text, a stop string, max_tokens, or its caller left (the
`cancel` event). Each row samples with its own temperature and top_p; streaming rows hand on text as it grows.
Beam search runs apart, through InstructModel.generate, once the batch is empty. wait_for() and stream(), at the
end, are how asyncio request handlers use the engine.

Why our own scheduler and not transformers' `init_continuous_batching` (checked with transformers 5.24 on CPU):
that API runs and samples temperature and top_p per request, but greedy decoding is one switch for the whole
manager (temperature 0 per request is not available), and it has no stop strings. Ours works over the model's
ordinary forward() and DynamicCache, so it runs wherever InstructModel runs. It does not chunk prefills: a long
prompt holds the batch for its prefill.
"""

import asyncio
import inspect
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from alpaca_trainml.generation.decoding import Completion, GenParams, cut_at_stop, stop_holdback

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting already (serve.py answers 503)."""


class EngineStopped(RuntimeError):
    """The server is shutting down: running and waiting requests end (serve.py answers 503)."""


class RequestCancelled(RuntimeError):
    """The caller left (its `cancel` event is set) before the answer was finished."""


@dataclass(eq=False)
class Job:
    ids: list  # prompt token ids
    params: GenParams
    on_text: Callable | None = None  # for streams: called from the model thread with each new piece of text
    cancel: threading.Event = field(default_factory=threading.Event)  # set when the caller leaves
    future: Future = field(default_factory=Future)  # the Completion


@dataclass(eq=False)
class Row:
    """A job in the running batch: the tokens it has made so far (end-of-text excluded) and the text sent."""

    job: Job
    ids: list = field(default_factory=list)
    made: int = 0  # tokens generated, end-of-text included (as usage counts them)
    sent: int = 0  # characters handed to on_text


def sample(logits, temperature, top_p):
    """One token per row of logits (batch, vocab), each row with its own temperature (0 = greedy) and top_p:
    the smallest set of likeliest tokens whose probability reaches top_p, as transformers' TopPLogitsWarper."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    nucleus = ((top_p < 1) & (temperature > 0)).nonzero().squeeze(-1)  # sorting the vocabulary costs: only these
    if len(nucleus):
        sorted_probs, order = probs[nucleus].sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the likelier tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p[nucleus, None], 0.0)  # the likeliest always stays
        probs[nucleus] = torch.zeros_like(sorted_probs).scatter(-1, order, sorted_probs)
    picked = torch.multinomial(probs, 1).squeeze(-1)
    return torch.where(temperature == 0, greedy, picked)


def _kv(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(kv):
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def merge(cache, mask, new_cache, new_mask):
    """One batch from two: rows are left-padded to the longer one (keys/values (batch, heads, seq, dim) with zeros,
    the attention mask (batch, seq) with 0), so that every row's next token goes in the same last column."""
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(t, n):  # n zero steps left of the seq dimension
        return F.pad(t, (0, 0, n, 0))

    a, b = width - mask.shape[1], width - new_mask.shape[1]
    kv = [
        (torch.cat([pad(k1, a), pad(k2, b)]), torch.cat([pad(v1, a), pad(v2, b)]))
        for (k1, v1), (k2, v2) in zip(_kv(cache), _kv(new_cache))
    ]
    return _cache(kv), torch.cat([F.pad(mask, (a, 0)), F.pad(new_mask, (b, 0))])


def select(cache, mask, keep):
    """The rows `keep` (indices), without the columns on the left that are now padding in every row."""
    mask = mask[keep]
    start = int(mask.any(0).nonzero()[0]) if mask.numel() else mask.shape[1]
    return _cache([(k[keep, :, start:], v[keep, :, start:]) for k, v in _kv(cache)]), mask[:, start:]


class Engine:
    """The one thread that calls the model; request handlers hand it Jobs and wait on their futures."""

    def __init__(self, model, max_batch_size=8, max_waiting=256):
        self.model, self.max_batch_size, self.max_waiting = model, max_batch_size, max_waiting
        self.eos = set(model.eos_ids)
        # transformers 5.24 renamed forward()'s past_key_values to cache (the old name goes in 5.40)
        params = inspect.signature(type(model.model).forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.steps = []  # batch size of each decoding step, the last 1000 (tests and /health look at them)
        self._reset()

    def _reset(self):
        self.inbox, self.waiting, self.rows, self.thread = queue.Queue(), deque(), [], None
        self.cache = self.mask = self.next_ids = None  # the running batch: its cache, mask and unfed tokens
        self.stopping = threading.Event()
        self.beam_job = None

    def queued(self):
        return self.inbox.qsize() + len(self.waiting)

    def running(self):
        return len(self.rows)

    def submit(self, job):
        if self.stopping.is_set():
            raise EngineStopped("the server is shutting down; retry on another server or later")
        if self.queued() >= self.max_waiting:
            raise QueueFullError(f"{self.queued()} requests are already waiting; retry later")
        self.inbox.put(job)
        return job.future

    def start(self):
        self._reset()
        self.thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self.thread.start()

    def shutdown(self):
        """End every request at the next step, without waiting (safe from a signal handler)."""
        self.stopping.set()
        if self.beam_job is not None:
            self.beam_job.cancel.set()
        self.inbox.put(None)

    def stop(self, timeout=30):
        if self.thread is not None:
            self.shutdown()
            self.thread.join(timeout)

    # --- the model thread ---------------------------------------------------------------------
    def _loop(self):
        while True:
            self._collect(block=not self.rows and not self.waiting)
            if self.stopping.is_set():
                self._collect(block=False)  # a job submitted as shutdown() was called
                error = EngineStopped("the server is shutting down; the request was not finished")
                self._end(self.rows + [Row(j) for j in self.waiting], error)
                return
            self.rows = self._without_cancelled(self.rows)
            if self.waiting and self.waiting[0].params.num_beams > 1 and not self.rows:
                self._run_apart(self.waiting.popleft())  # beams: when the batch is empty, one at a time
                continue
            try:
                self._admit()
                if self.rows:
                    self._step()
            except Exception as e:  # handed to every caller in the batch, who answers 500
                logger.exception("generation failed")
                self._end(self.rows, e)

    def _collect(self, block):
        """Move what arrived into `waiting`; block for the first one only when there is nothing to do."""
        try:
            item = self.inbox.get(block=block)
            while True:
                if item is not None:  # None: shutdown() woke us
                    self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _end(self, rows, error):
        for row in rows:
            if not row.job.future.done():
                if row.job.future.running() or row.job.future.set_running_or_notify_cancel():
                    row.job.future.set_exception(error)
        self.rows, self.cache, self.mask, self.next_ids = [], None, None, None
        if isinstance(error, EngineStopped):
            self.waiting.clear()

    def _without_cancelled(self, rows):
        keep = [i for i, r in enumerate(rows) if not r.job.cancel.is_set()]
        if len(keep) < len(rows):
            for r in rows:
                if r.job.cancel.is_set():
                    r.job.future.set_exception(RequestCancelled("the caller left; the answer was not finished"))
            self._keep(keep)
            return [rows[i] for i in keep]
        return rows

    def _keep(self, keep):
        if not keep:
            self.cache = self.mask = self.next_ids = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache, self.mask = select(self.cache, self.mask, index)
        self.next_ids = self.next_ids[index]

    @staticmethod
    def _claim(job):
        """Mark a waiting job as running; False for one whose caller left while it waited."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if job.cancel.is_set():
            job.future.set_exception(RequestCancelled("the caller left before the answer started"))
            return False
        return True

    def _run_apart(self, job):
        if not self._claim(job):
            return
        self.beam_job = job
        try:
            job.future.set_result(self.model.generate([job.ids], job.params, job.on_text, job.cancel)[0])
        except Exception as e:  # the caller answers 500
            logger.exception("generation failed")
            job.future.set_exception(e)
        finally:
            self.beam_job = None

    def _admit(self):
        """Prefill the waiting jobs that fit (beams wait for an empty batch) and merge them into the batch."""
        jobs = []
        while self.waiting and len(self.rows) + len(jobs) < self.max_batch_size:
            if self.waiting[0].params.num_beams > 1:
                break
            job = self.waiting.popleft()
            if self._claim(job):
                jobs.append(job)
        if not jobs:
            return
        new = [Row(j) for j in jobs]
        try:
            cache, mask, logits = self._prefill([j.ids for j in jobs])
        except Exception:
            self.rows += new  # the new callers get the error too
            raise
        if self.rows:
            self.cache, self.mask = merge(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask, self.next_ids = cache, mask, logits.new_zeros(0, dtype=torch.long)
        self.rows += new
        self.next_ids = torch.cat([self.next_ids, self._sample(new, logits)])
        self._emit(new, len(self.rows) - len(new))

    @torch.inference_mode()
    def _prefill(self, prompts):
        device = self.model.model.device
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.model.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()  # filled in place by forward()
        with self.model.lock:
            out = self.model.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,  # only the last position's logits: (batch, 1, vocab), not (batch, seq, vocab)
                **{self.cache_arg: cache},
            )
        return cache, mask, out.logits[:, -1]

    @torch.inference_mode()
    def _step(self):
        """Feed every row its last token; sample the next."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.mask.sum(-1, keepdim=True) - 1  # real tokens before the new one
        with self.model.lock:
            out = self.model.model(
                input_ids=self.next_ids[:, None],
                attention_mask=self.mask,
                position_ids=positions,
                use_cache=True,
                **{self.cache_arg: self.cache},
            )
        self.steps = [*self.steps[-999:], len(self.rows)]
        self.next_ids = self._sample(self.rows, out.logits[:, -1])
        self._emit(self.rows, 0)

    def _sample(self, rows, logits):
        temperature = torch.tensor([float(r.job.params.temperature) for r in rows], device=logits.device)
        top_p = torch.tensor([float(r.job.params.top_p) for r in rows], device=logits.device)
        return sample(logits, temperature, top_p)

    def _emit(self, rows, offset):
        """Give each row its sampled token; finished rows leave the batch."""
        tokens = self.next_ids[offset : offset + len(rows)].tolist()
        done = [r for r, t in zip(rows, tokens) if self._add(r, t)]
        if done:
            gone = {id(r) for r in done}
            self._keep([i for i, r in enumerate(self.rows) if id(r) not in gone])
            self.rows = [r for r in self.rows if id(r) not in gone]

    def _add(self, row, token):
        """Append one token to a row; True when the row has ended (and its caller has the Completion)."""
        job, stops = row.job, row.job.params.stop
        row.made += 1
        if token in self.eos:
            return self._finish(row, "stop")
        row.ids.append(token)
        if stops or job.on_text:
            text, stopped = cut_at_stop(self.model.decode(row.ids), stops)
            if stopped:
                return self._finish(row, "stop")
            end = len(text) - stop_holdback(text, stops)  # text that may still become a stop string waits
            if text.endswith("\ufffd"):  # half a UTF-8 character waits for its other half
                end = min(end, len(text) - 1)
            self._send(row, text[:end])
        if row.made >= job.params.max_tokens or len(job.ids) + row.made >= self.model.context_window:
            return self._finish(row, "length")
        return False

    def _send(self, row, upto):
        if row.job.on_text is not None and len(upto) > row.sent:
            try:
                row.job.on_text(upto[row.sent :])
            except Exception:  # a broken listener ends its own request, not the batch
                logger.exception("on_text failed; the request is cancelled")
                row.job.cancel.set()
            row.sent = len(upto)

    def _finish(self, row, reason):
        text = cut_at_stop(self.model.decode(row.ids), row.job.params.stop)[0]
        self._send(row, text)
        row.job.future.set_result(Completion(text, len(row.job.ids), row.made, reason))
        return True


# --- for asyncio callers: serve.py's request handlers -----------------------------------------------
async def wait_for(engine, jobs, is_disconnected, poll_s=0.25):
    """Submit the jobs and return their Completions. Every poll_s, `await is_disconnected()` is asked: once the
    caller has gone, its jobs leave the batch at the next step, and this raises RequestCancelled."""
    futures = []
    try:
        for job in jobs:  # one at a time: if the queue fills halfway, the finally takes back those already in
            futures.append(asyncio.wrap_future(engine.submit(job)))
        pending = set(futures)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=poll_s)
            if pending and await is_disconnected():
                raise RequestCancelled("the client closed the request")
        return [f.result() for f in futures]
    finally:
        for job in jobs:
            job.cancel.set()  # done, or the caller left: stop generating
        for f in futures:  # read each exception, now or when it lands: asyncio logs an unread one as an ERROR
            f.add_done_callback(lambda f: f.cancelled() or f.exception())


def _put(loop, deltas, item):
    try:
        loop.call_soon_threadsafe(deltas.put_nowait, item)
    except RuntimeError:  # the event loop has closed: nobody listens any more
        pass


def stream(engine, job):
    """Submit a streaming job now (a full queue raises here, before any answer starts); the async iterator of its
    text deltas, as the model thread makes them, and last its Completion. Closing it cancels the job."""
    loop, deltas = asyncio.get_running_loop(), asyncio.Queue()
    job.on_text = lambda text: _put(loop, deltas, text)
    future = engine.submit(job)
    future.add_done_callback(lambda f: _put(loop, deltas, None))

    async def items():
        try:
            while (text := await deltas.get()) is not None:
                yield text
            yield future.result()
        finally:
            job.cancel.set()

    return items()
