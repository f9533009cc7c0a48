"""self_instruct/rouge_dedup.py: ROUGE-L scores equal to rouge_score's, and the dedup keeps and drops exactly what
the original's loop did."""

import random

import numpy as np
from rouge_score import rouge_scorer, tokenizers

from alpaca_trainml.self_instruct import prompting, rouge_dedup

VOCAB = [
    "the",
    "a",
    "of",
    "cat",
    "Cat",
    "CATS",
    "run",
    "running",
    "x",
    "42",
    "4.2",
    "e-mail",
    "don't",
    "C++",
    "--",
    "!!",
    "café",
    "naïve",
    "日本語",
    "Ünïcødé",
    "🙂",
    "ß",
    "x_y",
    "",
    " ",
    "\t",
    "the the the",
    "A.B.C",
    "u.s.a",
    "(a)",
]


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
    deduper = rouge_dedup.RougeLDeduper()
    ours = []
    for new, old in pairs:
        assert rouge_dedup.rouge_tokenize.tokenize(new, None) == default.tokenize(new)
        code, pool_code = deduper.encode(new), deduper.encode(old)
        ours.append(deduper.scores(code, [pool_code], [len(pool_code)])[0])
    ref = [rouge_scorer._score_lcs(default.tokenize(new), default.tokenize(old)).fmeasure for new, old in pairs]
    via_public = [public.score(new, old)["rougeL"].fmeasure for new, old in pairs]  # score(target, prediction)
    assert np.max(np.abs(np.array(ours) - ref)) <= 1e-9
    assert np.max(np.abs(np.array(ours) - via_public)) <= 1e-9
    assert [s > 0.7 for s in ours] == [s > 0.7 for s in ref]
    # the pairs span the range: empty/no overlap, partial, above the 0.7 cut and identical
    assert (
        min(ours) == 0 and max(ours) == 1 and sum(0 < s <= 0.7 for s in ours) > 100 and sum(s > 0.7 for s in ours) > 20
    )


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
        kept.append(
            {
                "instruction": cand,
                "most_similar_instructions": {pool[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]},
                "avg_similarity_score": float(np.mean(scores)),
            }
        )
        pool.append(cand)
        tokens.append(new)
    return kept


def test_dedup_keeps_and_drops_exactly_as_the_original():
    seeds = [t["instruction"] for t in prompting.load_seed_tasks(prompting.SEED_TASKS_PATH)]
    rng = random.Random(1)
    candidates = []
    for i in range(240):  # edits of seed instructions (near-duplicates) and of earlier candidates, plus new ones
        words = (
            rng.choice(seeds + candidates).split() if i % 3 else f"Invent item {i} with colour {rng.random()}".split()
        )
        if len(words) > 2:
            words.pop(rng.randrange(len(words)))
        candidates.append(" ".join(words + rng.sample(["now", "please", "briefly", "x"], rng.randint(0, 2))))
    expected = original_filter(seeds, candidates)
    deduper, records = rouge_dedup.RougeLDeduper(seeds), []
    for start in range(0, len(candidates), 7):
        for cand, (keep, scores) in zip(
            candidates[start : start + 7], deduper.filter_batch(candidates[start : start + 7])
        ):
            if keep:
                records.append({"instruction": cand, **rouge_dedup.similarity_fields(scores, deduper.instructions)})
    assert 40 < len(expected) < 200  # both decisions occur (240 candidates)
    assert [r["instruction"] for r in records] == [r["instruction"] for r in expected]
    for ours, ref in zip(records, expected):
        assert list(ours["most_similar_instructions"]) == list(
            ref["most_similar_instructions"]
        )  # same ties, same order
        assert np.allclose(
            list(ours["most_similar_instructions"].values()),
            list(ref["most_similar_instructions"].values()),
            rtol=0,
            atol=1e-9,
        )
        assert abs(ours["avg_similarity_score"] - ref["avg_similarity_score"]) <= 1e-9
