"""engine.py: the continuous-batching scheduler, driven directly (no HTTP). A real 2-layer Llama with random weights
(conftest's tiny_llama_dir) decodes greedily, so the batched answers can be compared token for token with
transformers' own generate() run one request at a time."""

import asyncio
import threading

import pytest
import torch

from alpaca_trainml.generation.engine import (
    Engine,
    EngineStopped,
    Job,
    QueueFullError,
    RequestCancelled,
    sample,
    stream,
    wait_for,
)
from alpaca_trainml.generation.llama_step import LlamaStep
from inference import GenParams, InstructModel

PROMPTS = [
    "Name the main subject.",
    "Summarize the text. The river paints three apples and a long letter about the weather report.",
    "Count the words.",
    "Give a one-word title for a quiet village that remembers every number below ten.",
]
GREEDY = GenParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return InstructModel(str(tiny_llama_dir))


@pytest.fixture
def engine(model):
    engine = Engine(model, max_batch_size=8)
    engine.start()
    yield engine
    engine.stop()


def solo(model, ids, params):
    """The reference: transformers' generate() on this one prompt (InstructModel.generate)."""
    return model.generate([ids], params)[0]


def test_sample_follows_each_rows_settings():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]] * 4))  # probabilities 0.6, 0.3, 0.1
    temperature = torch.tensor([0.0, 1.0, 1.0, 2.0])
    top_p = torch.tensor([1.0, 0.5, 0.8, 1.0])
    torch.manual_seed(0)
    picks = torch.stack([sample(logits, temperature, top_p) for _ in range(400)])  # (draws, rows)
    assert picks[:, 0].eq(0).all()  # greedy
    assert picks[:, 1].eq(0).all()  # top_p 0.5: the 0.6 token alone reaches it
    assert set(picks[:, 2].tolist()) == {0, 1}  # top_p 0.8: 0.6 + 0.3 reach it; the 0.1 token never comes
    assert set(picks[:, 3].tolist()) == {0, 1, 2}  # temperature 2 flattens: all three come up in 400 draws


def test_greedy_rows_joining_mid_run_match_one_at_a_time(model, engine):
    """Requests of different lengths join a running batch (one arrives while the first is decoding) and still
    answer exactly as each alone: the padding, positions and cache merging change nothing."""
    ids = [model.encode(p) for p in PROMPTS]
    expected = [solo(model, i, GREEDY) for i in ids]
    later = [Job(i, GREEDY) for i in ids[1:]]
    joined = threading.Event()

    def on_first_text(text):  # runs on the model thread, while the first request is decoding
        if not joined.is_set():
            joined.set()
            for job in later:
                engine.submit(job)

    first = Job(ids[0], GREEDY, on_text=on_first_text)
    engine.submit(first)
    got = [j.future.result(timeout=120) for j in [first, *later]]
    assert joined.is_set()
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in got] == [
        (e.text, e.completion_tokens, e.finish_reason) for e in expected
    ]
    assert max(engine.steps) == len(PROMPTS)  # all four decoded in one step at some point


def test_per_request_settings_inside_one_batch(model, engine):
    ids = model.encode(PROMPTS[0])
    greedy = solo(model, ids, GREEDY)
    stop = greedy.text[3:5]  # a stop string the greedy answer is known to contain
    jobs = [
        Job(ids, GREEDY),
        Job(ids, GenParams(max_tokens=3, temperature=0)),
        Job(ids, GenParams(max_tokens=12, temperature=0, stop=(stop,))),
        Job(ids, GenParams(max_tokens=12, temperature=1.5, top_p=0.9)),
    ]
    for j in jobs:
        engine.submit(j)
    full, short, stopped, sampled = [j.future.result(timeout=120) for j in jobs]
    assert full.text == greedy.text
    assert short.completion_tokens == 3 and short.finish_reason == "length" and greedy.text.startswith(short.text)
    assert stopped.text == greedy.text[: greedy.text.index(stop)] and stopped.finish_reason == "stop"
    assert 1 <= sampled.completion_tokens <= 12


def test_a_cancelled_request_leaves_at_the_next_step(model, engine):
    long = GenParams(max_tokens=400, temperature=0)
    leaving = Job(model.encode(PROMPTS[1]), long)
    leaving.on_text = lambda text: leaving.cancel.set()  # the client leaves as soon as text arrives
    staying = Job(model.encode(PROMPTS[0]), GREEDY)
    engine.submit(leaving)
    engine.submit(staying)
    with pytest.raises(RequestCancelled):
        leaving.future.result(timeout=120)
    assert staying.future.result(timeout=120).text == solo(model, staying.ids, GREEDY).text
    assert engine.running() == 0 and len(engine.steps) < 50  # 400 tokens were asked for; the batch moved on


def test_shutdown_ends_running_and_waiting_requests(model):
    engine = Engine(model, max_batch_size=1)
    started = threading.Event()
    running = Job(model.encode(PROMPTS[0]), GenParams(max_tokens=1000, temperature=0), on_text=lambda t: started.set())
    waiting = Job(model.encode(PROMPTS[1]), GREEDY)
    engine.start()
    engine.submit(running)
    engine.submit(waiting)
    assert started.wait(120)
    engine.stop(timeout=60)
    assert not engine.thread.is_alive()
    for job in (running, waiting):
        with pytest.raises(EngineStopped):
            job.future.result(timeout=1)
    with pytest.raises(EngineStopped):
        engine.submit(Job([1], GREEDY))


def test_a_model_failure_fails_the_batch_and_the_engine_goes_on(model, engine, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("out of memory, say")

    ids = model.encode(PROMPTS[0])
    monkeypatch.setattr(model.model, "forward", broken)  # transformers' forward (the generic step)
    monkeypatch.setattr(LlamaStep, "prefill", broken)  # and our Llama step
    monkeypatch.setattr(LlamaStep, "kernel_step", broken)  # and its kernel's pass (fused.py's prompts go there)
    jobs = [Job(ids, GREEDY), Job(ids, GREEDY)]
    for j in jobs:
        engine.submit(j)
    for j in jobs:
        with pytest.raises(RuntimeError, match="out of memory, say"):
            j.future.result(timeout=120)
    monkeypatch.undo()
    assert engine.submit(Job(ids, GREEDY)).result(timeout=120).text == solo(model, ids, GREEDY).text


def test_a_full_queue_refuses(model):
    engine = Engine(model, max_waiting=2)  # not started: nothing leaves the queue
    engine.submit(Job([1], GREEDY))
    engine.submit(Job([1], GREEDY))
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        engine.submit(Job([1], GREEDY))


def test_beam_search_runs_apart(model, engine):
    ids = model.encode(PROMPTS[2])
    beams = GenParams(max_tokens=8, temperature=0, num_beams=2)
    assert engine.submit(Job(ids, beams)).result(timeout=120).text == solo(model, ids, beams).text


def test_wait_for_and_stream_serve_asyncio_callers(model, engine):
    ids = model.encode(PROMPTS[0])
    expected = solo(model, ids, GREEDY)

    async def go():
        (done,) = await wait_for(engine, [Job(ids, GREEDY)], _false)
        items = [item async for item in stream(engine, Job(ids, GREEDY))]
        return done, items

    done, items = asyncio.run(go())
    assert done.text == expected.text
    assert "".join(items[:-1]) == expected.text and items[-1].text == expected.text  # deltas, then the Completion


def test_wait_for_gives_up_when_the_caller_leaves(model, engine):
    job = Job(model.encode(PROMPTS[1]), GenParams(max_tokens=400, temperature=0))

    async def gone():
        return True

    with pytest.raises(RequestCancelled):
        asyncio.run(wait_for(engine, [job], gone, poll_s=0.01))
    assert job.cancel.is_set()
    with pytest.raises(RequestCancelled):  # the engine took it out of the batch, unfinished
        job.future.result(timeout=120)


async def _false():
    return False
