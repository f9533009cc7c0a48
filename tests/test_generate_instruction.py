"""generate_instruction.py: golden prompt/parse/filter tests, ROUGE-L equivalence with rouge_score, and runs of the
real script against a scripted OpenAI-compatible server (tests/fake_openai.py) with injected faults and kill -9."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenizers

import generate_instruction as gi
from conftest import ROOT, subprocess_env
from fake_openai import FakeOpenAI

K = 3  # example tasks per prompt, the original's default


# ---------------------------------------------------------------------------------------------
# prompt.txt, encode_prompt, parsing and filters
def test_prompt_txt_numbers_its_rules_1_to_n_and_keeps_the_requirements():
    text = gi.PROMPT_PATH.read_text()
    numbers = [int(m) for m in re.findall(r"^(\d+)\. ", text, flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 7  # the original repeats 2 and 3
    for needle in ("20", "<noinput>", "100 words", "English", "one or two sentences", "verb", "text-only"):
        assert needle in text, needle


def test_encode_prompt_golden_and_independent_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # prompt.txt is found next to the code, not here
    tasks = [{"instruction": "  Sort   these\n words:", "input": "pear apple", "output": "apple pear"},
             {"instruction": "Name a prime number.", "input": "", "output": "7"}]
    expected = (gi.PROMPT_PATH.read_text().rstrip("\n") + "\n"
                "###\n1. Instruction: Sort these words\n1. Input:\npear apple\n1. Output:\napple pear\n"
                "###\n2. Instruction: Name a prime number.\n2. Input:\n<noinput>\n2. Output:\n7\n"
                "###\n3. Instruction:")
    assert gi.encode_prompt(tasks) == expected


RESPONSE = (" Explain why the sky looks blue at noon.\n4. Input:\n<noinput>\n4. Output:\nSunlight scatters.\n###\n"
            "5. Instruction: Draw a picture of a happy cat.\n5. Input:\n<noinput>\n5. Output:\nNo.\n###\n"
            "6. Instruction: Write a program that adds two numbers.\n6. Input:\n1 2\n6. Output:\n3\n###\n"
            "7. Instruction: Name three fruits.\n7. Input:\n<noinput>\n7. Output:\nApple.\n###\n"
            "8. Instruction: \"Quote\" this sentence back to me please.\n8. Input:\nHi\n8. Output:\nHi\n###\n"
            "9. Instruction: Élaborez a short plan for the week ahead.\n9. Input:\n<noinput>\n9. Output:\nOK\n###\n"
            "10. Instruction: This piece has no input or output markers at all\n###\n"
            "11. Instruction:   Summarize the note in one line.  \n11. Input:\n  Buy milk, call Sam.  \n11. Output:\nErrands.\n###\n"
            "12. Instruction: Translate this greeting into French please.\n12. Input:\nHello\n12. Output:\nBonj")


def test_post_process_gpt3_response_golden():
    kept = gi.post_process_gpt3_response(K, {"text": RESPONSE, "finish_reason": "stop"})
    assert kept == [
        {"instruction": "Explain why the sky looks blue at noon.", "input": "", "output": "Sunlight scatters."},
        {"instruction": "Summarize the note in one line.", "input": "Buy milk, call Sam.", "output": "Errands."},
        {"instruction": "Translate this greeting into French please.", "input": "Hello", "output": "Bonj"},
    ]
    # finish_reason "length": the last piece (task 12) is dropped even though it parses
    cut = gi.post_process_gpt3_response(K, {"text": RESPONSE, "finish_reason": "length"})
    assert [r["instruction"] for r in cut] == [r["instruction"] for r in kept[:2]]
    assert gi.post_process_gpt3_response(K, None) == []


def test_parse_response_counts_and_rejection_reasons():
    stats = Counter()
    records = gi.parse_response(K, RESPONSE, "length", stats)
    assert stats == {"malformed": 1, "truncated": 1}  # task 10 has no markers; task 12 is the cut-off last piece
    reasons = [gi.rejection_reason(r["instruction"]) for r in records]
    assert reasons == [None, "blocklist", "program", "length", "punctuation", "non_ascii", None]


def test_filters_word_count_bounds_and_blocklist_words():
    assert gi.rejection_reason("one two three") == "length"  # <= 3 words dropped
    assert gi.rejection_reason("one two three four") is None
    assert gi.rejection_reason(" ".join(["word"] * 150)) is None  # > 150 dropped
    assert gi.rejection_reason(" ".join(["word"] * 151)) == "length"
    assert gi.find_word_in_string("image", "Describe this IMAGE please")
    assert not gi.find_word_in_string("image", "Imagine a world without cars")  # whole words only
    assert gi.rejection_reason("Tell me how to go to the station") == "blocklist"
    assert gi.rejection_reason("Write a program, or explain the idea") == "program"
    assert gi.rejection_reason("write a program that prints hi") is None  # case-sensitive, as the original


def test_strip_chat_echo_and_api_choice():
    assert gi.strip_chat_echo("###\n4. Instruction: Do X now.\n4. Input:", 3) == " Do X now.\n4. Input:"
    assert gi.strip_chat_echo("4.  Instruction: Do X", 3) == " Do X"
    assert gi.strip_chat_echo(" Do X", 3) == " Do X"
    table = {"gpt-4o-mini": "chat", "gpt-5": "chat", "o3-mini": "chat", "meta-llama/Llama-3.1-8B-Instruct": "chat",
             "smollm2": "chat", "text-davinci-003": "completions", "gpt-3.5-turbo-instruct": "completions",
             "davinci-002": "completions", "openai-community/gpt2": "completions"}
    assert {m: gi.choose_api("auto", m) for m in table} == table
    assert gi.choose_api("completions", "gpt-4o-mini") == "completions"
    with pytest.raises(ValueError, match="expected auto, completions or chat"):
        gi.choose_api("responses", "gpt-4o-mini")
    # token 50256 is <|endoftext|> only in the GPT-2/GPT-3 vocabularies; in cl100k (davinci-002) it is a word piece
    assert [gi.uses_gpt2_tokenizer(m) for m in ("text-davinci-003", "gpt2-xl", "davinci-002", "gpt-4o-mini")] == \
        [True, True, False, False]


# ---------------------------------------------------------------------------------------------
# Seed tasks
def test_project_seed_tasks_schema_and_mix():
    lines = [json.loads(line) for line in gi.SEED_TASKS_PATH.read_text().splitlines() if line.strip()]
    assert len(lines) == 175  # the Self-Instruct count, which the issue asks for
    assert all(set(t) == {"id", "name", "instruction", "instances", "is_classification"} for t in lines)
    assert len({t["id"] for t in lines}) == 175 and len({t["instruction"] for t in lines}) == 175
    with_input = sum(bool(t["instances"][0]["input"]) for t in lines)
    assert 0.25 <= with_input / 175 <= 0.45  # "about a third with inputs"
    assert len(gi.load_seed_tasks(gi.SEED_TASKS_PATH)) == 175


def test_load_seed_tasks_reads_the_self_instruct_layout_and_reports_every_bad_line(tmp_path):
    good = tmp_path / "seed.jsonl"  # Self-Instruct's layout: extra fields, several instances, the first one used
    good.write_text(json.dumps({"id": "seed_task_0", "name": "x", "instruction": "Add the numbers.", "is_classification": False,
                                "instances": [{"input": "2 3", "output": "5"}, {"input": "1 1", "output": "2"}]}) + "\n\n")
    assert gi.load_seed_tasks(good) == [{"instruction": "Add the numbers.", "input": "2 3", "output": "5"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok", "instances": [{"input": "", "output": "y"}]}\n{not json\n'
                   '{"instances": []}\n{"instruction": "x", "instances": [{"input": ""}]}\n')
    with pytest.raises(ValueError) as err:
        gi.load_seed_tasks(bad)
    msg = str(err.value)
    assert str(bad) in msg and "3 bad seed task(s)" in msg
    assert all(f"line {n}:" in msg for n in (2, 3, 4)) and "line 1:" not in msg


def test_check_options_collects_every_problem():
    with pytest.raises(ValueError) as err:
        gi.check_options("responses", 19, 175, 0, 5)
    assert "--api 'responses'" in str(err.value) and "--num_prompt_instructions 19" in str(err.value)
    assert "--max_workers 0" in str(err.value)


# ---------------------------------------------------------------------------------------------
# ROUGE-L: equal to rouge_score, same decisions as the original loop
VOCAB = ["the", "a", "of", "cat", "Cat", "CATS", "run", "running", "x", "42", "4.2", "e-mail", "don't", "C++", "--", "!!",
         "café", "naïve", "日本語", "Ünïcødé", "🙂", "ß", "x_y", "", " ", "\t", "the the the", "A.B.C", "u.s.a", "(a)"]


def random_texts(rng, n):
    texts = ["", " ", "!!! ???", "日本語 のみ", "the", "the the the the", "a b c d e f g h", "A b C d e F g H!!"]
    while len(texts) < n:
        texts.append(" ".join(rng.choice(VOCAB) for _ in range(rng.randint(0, 14))))
    return texts


def test_rouge_l_scores_equal_rouge_score_on_588_pairs():
    rng = random.Random(0)
    texts = random_texts(rng, 80)
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(500)] + [(t, t) for t in texts[:8]]
    for text in texts:  # near-duplicates: one word dropped and one added
        words = text.split(" ")
        words.pop(rng.randrange(len(words)))
        pairs.append((text, " ".join(words + [rng.choice(VOCAB)])))
    default = tokenizers.DefaultTokenizer(use_stemmer=False)
    public = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    deduper = gi.RougeLDeduper()
    ours = []
    for new, old in pairs:
        assert gi.rouge_tokenize.tokenize(new, None) == default.tokenize(new)
        code, pool_code = deduper.encode(new), deduper.encode(old)
        ours.append(deduper.scores(code, [pool_code], [len(pool_code)])[0])
    ref = [rouge_scorer._score_lcs(default.tokenize(new), default.tokenize(old)).fmeasure for new, old in pairs]
    via_public = [public.score(new, old)["rougeL"].fmeasure for new, old in pairs]  # score(target, prediction)
    assert np.max(np.abs(np.array(ours) - ref)) <= 1e-9
    assert np.max(np.abs(np.array(ours) - via_public)) <= 1e-9
    assert [s > 0.7 for s in ours] == [s > 0.7 for s in ref]
    # the pairs span the range: empty/no overlap, partial, above the 0.7 cut and identical
    assert min(ours) == 0 and max(ours) == 1 and sum(0 < s <= 0.7 for s in ours) > 100 and sum(s > 0.7 for s in ours) > 20


def original_filter(pool, candidates):
    """The original's loop, serially: rouge_score on pre-tokenized instructions, keep if the best F <= 0.7."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokens = [scorer._tokenizer.tokenize(t) for t in pool]
    pool, kept = list(pool), []
    for cand in candidates:
        new = scorer._tokenizer.tokenize(cand)
        scores = [rouge_scorer._score_lcs(new, t).fmeasure for t in tokens]
        if max(scores) > 0.7:
            continue
        kept.append({"instruction": cand, "most_similar_instructions": {pool[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]},
                     "avg_similarity_score": float(np.mean(scores))})
        pool.append(cand)
        tokens.append(new)
    return kept


def test_dedup_keeps_and_drops_exactly_as_the_original():
    seeds = [t["instruction"] for t in gi.load_seed_tasks(gi.SEED_TASKS_PATH)]
    rng = random.Random(1)
    candidates = []
    for i in range(240):  # edits of seed instructions (near-duplicates) and of earlier candidates, plus new ones
        words = rng.choice(seeds + candidates).split() if i % 3 else f"Invent item {i} with colour {rng.random()}".split()
        if len(words) > 2:
            words.pop(rng.randrange(len(words)))
        candidates.append(" ".join(words + rng.sample(["now", "please", "briefly", "x"], rng.randint(0, 2))))
    expected = original_filter(seeds, candidates)
    deduper, records = gi.RougeLDeduper(seeds), []
    for start in range(0, len(candidates), 7):
        for cand, (keep, scores) in zip(candidates[start:start + 7], deduper.filter_batch(candidates[start:start + 7])):
            if keep:
                records.append({"instruction": cand, **gi.similarity_fields(scores, deduper.instructions)})
    assert 40 < len(expected) < 200  # both decisions occur (240 candidates)
    assert [r["instruction"] for r in records] == [r["instruction"] for r in expected]
    for ours, ref in zip(records, expected):
        assert list(ours["most_similar_instructions"]) == list(ref["most_similar_instructions"])  # same ties, same order
        assert np.allclose(list(ours["most_similar_instructions"].values()), list(ref["most_similar_instructions"].values()),
                           rtol=0, atol=1e-9)
        assert abs(ours["avg_similarity_score"] - ref["avg_similarity_score"]) <= 1e-9
