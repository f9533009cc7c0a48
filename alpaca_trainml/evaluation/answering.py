"""Answers for an eval set through the serving engine: continuous batching, as serve.py runs it, so generating a
model_outputs file runs at the serving throughput (a finished row's slot goes to the next prompt at once, instead of
every batch waiting for its longest answer)."""

from concurrent.futures import as_completed

from alpaca_trainml.cli import UsageError
from alpaca_trainml.generation.engine import Engine, Job


def encode_task(model, task, i, max_tokens, flag="eval_set"):
    """The task's prompt ids; an over-long input is cut at its end. UsageError naming the row if it cannot fit."""
    try:
        ids = model.encode_instruction(task["instruction"], task.get("input") or None, truncate=True)
        model.check_fits(len(ids), max_tokens)
        return ids
    except ValueError as e:
        raise UsageError(f"--{flag} row {i}: {e}") from e


def answer_all(model, prompts, params, batch_size, on_answer):
    """Generate every prompt (token ids) with params, up to batch_size at a time; on_answer(index, Completion) is
    called here, in this thread, as each answer lands (not in prompt order)."""
    # max_waiting: every prompt is queued at once; the engine admits batch_size of them at a time
    engine = Engine(model, batch_size, max(len(prompts), 1))
    engine.start()
    try:
        futures = {engine.submit(Job(list(ids), params)): i for i, ids in enumerate(prompts)}
        for future in as_completed(futures):
            on_answer(futures[future], future.result())
    finally:
        engine.stop()
