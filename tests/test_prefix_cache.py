"""generation/prefix_cache.py: a prompt that starts like a kept one copies those positions' keys and values and
prefills the rest. Its logits and cache must be those of a full prefill, bit for bit; the cache keeps what fits its
budget, the least recently used leaving first."""

import numpy as np
import torch
import transformers

from alpaca_trainml.generation import fused
from alpaca_trainml.generation.batch import DecodeBatch, Job, run_to_end
from alpaca_trainml.generation.decoding import GenParams
from alpaca_trainml.generation.engine import Engine
from alpaca_trainml.generation.kv_cache import SlotCache
from alpaca_trainml.generation.llama_step import LlamaStep
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.generation.prefix_cache import PrefixCache, common_length


def filled_cache(rows, length, layers=2):
    """A SlotCache whose row r holds the value r + position / 1000 everywhere (so copies can be traced)."""
    cache = SlotCache(layers, 1, 4, torch.float32, "cpu")
    for _ in range(rows):
        cache.add_row(length)
    for store in (cache.keys, cache.values):
        for t in store:
            t[:rows] = torch.arange(rows)[:, None, None, None] + torch.arange(t.shape[2])[None, None, :, None] / 1000
    return cache


def test_common_length_counts_the_shared_opening():
    assert common_length(np.array([1, 2, 3]), np.array([1, 2, 4, 5])) == 2
    assert common_length(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert common_length(np.array([7]), np.array([1])) == 0


def test_a_match_leaves_the_last_token_to_compute_and_copies_the_rest():
    cache, kept = filled_cache(2, 6), PrefixCache(2**20)
    kept.store(cache, 1, [5, 6, 7, 8, 9, 10])
    assert kept.match([5, 6, 7, 1]) == (3, (5, 6, 7, 8, 9, 10))
    assert kept.match([5, 6, 7, 8, 9, 10]) == (5, (5, 6, 7, 8, 9, 10))  # the same prompt: all but its last token
    assert kept.match([4, 6]) == (0, None)
    row = cache.add_row(4)
    kept.load(cache, row, (5, 6, 7, 8, 9, 10), 3)
    for t in cache.keys + cache.values:
        assert torch.equal(t[row, :, :3], t[1, :, :3])  # row 1's first three positions
        assert not t[row, :, 3:].any()
    assert (kept.reused, kept.queried) == (3, 6)


def test_the_budget_keeps_the_most_recently_used_and_a_longer_prompt_replaces_its_prefix():
    cache = filled_cache(4, 10)
    per_position = 2 * 2 * 1 * 4 * 4  # keys and values, 2 layers, 1 head of 4 floats
    kept = PrefixCache(25 * per_position)
    kept.store(cache, 0, [1, 2, 3, 4, 5])
    kept.store(cache, 1, [1, 2, 3, 4, 5, 6, 7])  # starts with the first: that one leaves
    assert list(kept.entries) == [(1, 2, 3, 4, 5, 6, 7)] and kept.bytes == 7 * per_position
    kept.store(cache, 2, [9] * 10)
    kept.match([1, 2, 3, 0])
    kept.load(cache, cache.add_row(4), (1, 2, 3, 4, 5, 6, 7), 3)  # used: now the most recent
    kept.store(cache, 3, [8] * 10)  # 27 positions > 25: the least recently used ([9] * 10) leaves
    assert list(kept.entries) == [(1, 2, 3, 4, 5, 6, 7), (8,) * 10] and kept.bytes == 17 * per_position
    kept.store(cache, 0, [0] * 26)  # larger than the whole budget: not kept, nothing else leaves
    assert len(kept.entries) == 2


def test_a_prompt_prefilled_from_a_kept_prefix_gets_a_full_prefills_numbers(decode_kernel, tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    first, second = [3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 6, 11, 12]
    full, reused = LlamaStep(model), LlamaStep(model)
    assert reused.fuses
    _, want = fused.step(full, None, [second])
    kept = PrefixCache(2**20)
    fused.step(reused, None, [first], kept)
    reused.keep([])  # its row leaves (the cache empties): the kept copy stays
    found = [kept.match(second)]
    assert found[0][0] == 4
    _, got = fused.step(reused, None, [second], kept, found)
    assert torch.equal(got, want)
    for ours, theirs in zip(reused.cache.keys + reused.cache.values, full.cache.keys + full.cache.values):
        assert torch.equal(ours[0, :, :6], theirs[0, :, :6])


def test_greedy_answers_are_the_same_with_the_cache_and_without(decode_kernel, tiny_llama_dir):
    model = InstructModel(str(tiny_llama_dir))
    texts = ["Say hi", "Say hello", "Name a colour", "Say hi"]
    prompts = [model.encode(text) for text in texts]
    greedy = GenParams(max_tokens=8, temperature=0)
    model.prefix_cache_mb = 0
    plain = [j.text for j in run_to_end(model, [Job(ids, greedy) for ids in prompts])]
    model.prefix_cache_mb = 16
    batch = DecodeBatch(model)
    jobs = [Job(ids, greedy) for ids in prompts]
    for job in jobs:  # one at a time: each finds the prompts before it kept
        batch.admit([job])
        batch.step()
    while batch.rows:
        batch.step()
    assert [j.future.result().text for j in jobs] == plain
    shared = [
        max((common_length(np.array(p), np.array(q)) for q in prompts[:i]), default=0) for i, p in enumerate(prompts)
    ]
    assert batch.prefixes.reused == sum(min(n, len(p) - 1) for n, p in zip(shared, prompts))
    assert shared[3] == len(prompts[3])  # "Say hi" again: all but its last token came from the cache


def test_the_engine_tells_each_job_how_many_prompt_tokens_it_found(decode_kernel, tiny_llama_dir):
    model = InstructModel(str(tiny_llama_dir))
    engine = Engine(model, max_batch_size=2)
    engine.start()
    try:
        ids = model.encode("Name a colour")
        jobs = [Job(list(ids), GenParams(max_tokens=3, temperature=0)) for _ in range(2)]
        for job in jobs:  # one after the other: the second finds the first's prompt kept
            engine.submit(job).result(timeout=60)
    finally:
        engine.stop()
    assert [j.cached for j in jobs] == [0, len(ids) - 1]
    first, second = (j.future.result() for j in jobs)
    assert first.text == second.text and (first.cached_tokens, second.cached_tokens) == (0, len(ids) - 1)
