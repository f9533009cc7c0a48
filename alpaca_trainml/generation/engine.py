"""Continuous batching for serve.py: the scheduler. One model thread decodes every running request one token per
step, through the decoder core (batch.DecodeBatch: the model step, the cache operations, sampling and stop handling;
with speculative decoding, speculative.py, a step checks each row's draft and can make several tokens per row).

A request joins the running batch at the next step (its prompt is prefilled into the batch's cache), and leaves when
it ends: end of text, a stop string, max_tokens, or its caller left (the `cancel` event). Each row samples with its
own temperature and top_p; streaming rows hand on text as it grows. Beam search runs apart, through
InstructModel.generate, once the batch is empty. wait_for() and stream(), at the end, are how asyncio request
handlers use the engine.

Why our own scheduler and not transformers' `init_continuous_batching` (checked with transformers 5.24 on CPU):
that API runs and samples temperature and top_p per request, but greedy decoding is one switch for the whole
manager (temperature 0 per request is not available), and it has no stop strings. Ours runs wherever InstructModel
runs. New prompts go in with the running rows' next step (fused.py, through DecodeBatch.admit); a prompt longer
than fused.BUDGET positions goes in a chunk of that many positions per step (chunked.py), the batch decoding meanwhile.
"""

import asyncio
import logging
import queue
import threading
from collections import deque

from alpaca_trainml.generation.batch import DecodeBatch, Job, fail, sample
from alpaca_trainml.generation.lora_adapters import applied

__all__ = ["Engine", "EngineStopped", "Job", "QueueFullError", "RequestCancelled", "sample", "stream", "wait_for"]

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting already (serve.py answers 503)."""


class EngineStopped(RuntimeError):
    """The server is shutting down: running and waiting requests end (serve.py answers 503)."""


class RequestCancelled(RuntimeError):
    """The caller left (its `cancel` event is set) before the answer was finished."""


class Engine:
    """The one thread that calls the model; request handlers hand it Jobs and wait on their futures."""

    def __init__(self, model, max_batch_size=8, max_waiting=256):
        self.model, self.max_batch_size, self.max_waiting = model, max_batch_size, max_waiting
        self.steps = []  # batch size of each decoding step, the last 1000 (tests and /health look at them)
        self._reset()

    def _reset(self):
        self.inbox, self.waiting, self.thread = queue.Queue(), deque(), None
        self.batch = None  # the running batch (DecodeBatch), made on the model thread
        self.stopping = threading.Event()
        self.beam_job = None

    @property
    def rows(self):
        return self.batch.rows if self.batch is not None else []

    def busy(self):
        """Rows running, or long prompts on their way in (chunked.py)."""
        return bool(self.rows or (self.batch is not None and self.batch.filling))

    def queued(self):
        return self.inbox.qsize() + len(self.waiting)

    def running(self):
        """Rows still decoding: a row whose answer was just handed over leaves the batch a moment later, and a client
        that reads /health or /metrics after its answer must not see it (test_metrics failed so under load)."""
        return sum(not job.future.done() for job in self.batch.jobs()) if self.batch is not None else 0

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
        self.batch = DecodeBatch(self.model)
        while True:
            self._collect(block=not self.busy() and not self.waiting)
            if self.stopping.is_set():
                self._collect(block=False)  # a job submitted as shutdown() was called
                error = EngineStopped("the server is shutting down; the request was not finished")
                for job in self.waiting:
                    fail(job, error)
                self.waiting.clear()
                self.batch.end(error)
                return
            self._drop_cancelled()
            if self.waiting and self.waiting[0].params.num_beams > 1 and not self.busy():
                self._run_apart(self.waiting.popleft())  # beams: when the batch is empty, one at a time
                continue
            try:
                self._admit()
                if self.busy():
                    self.steps = [*self.steps[-999:], len(self.rows)]
                    self.batch.step()
            except Exception as e:  # handed to every caller in the batch, who answers 500
                logger.exception("generation failed")
                self.batch.end(e)

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

    def _drop_cancelled(self):
        leaving = [r for r in self.rows if r.job.cancel.is_set()]
        filling = [f.job for f in self.batch.filling if f.job.cancel.is_set()]
        for job in [r.job for r in leaving] + filling:
            fail(job, RequestCancelled("the caller left; the answer was not finished"))
        self.batch.drop(leaving)
        self.batch.drop_filling(filling)

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
            with applied(self.model.model, job.adapter):  # a LoRA adapter's delta, through transformers' forward
                job.future.set_result(self.model.generate([job.ids], job.params, job.on_text, job.cancel)[0])
        except Exception as e:  # the caller answers 500
            logger.exception("generation failed")
            job.future.set_exception(e)
        finally:
            self.beam_job = None

    def _admit(self):
        """Prefill the waiting jobs that fit (beams wait for an empty batch) and add them to the batch."""
        jobs = []
        while self.waiting and len(self.batch.jobs()) + len(jobs) < self.max_batch_size:
            if self.waiting[0].params.num_beams > 1:
                break
            job = self.waiting.popleft()
            if self._claim(job):
                jobs.append(job)
        if jobs:
            self.batch.admit(jobs)


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
