"""evaluation/judging.py: the judge prompt, the verdict parser, pairing the two files' rows, and the statistics
against hand-computed values. Pure functions, called directly; evaluate.py's judging runs are in test_evaluate.py."""

import numpy as np
import pytest

from alpaca_trainml.evaluation import judging


def task_rows(n, generator):
    """n output rows, one task each; every third has an input."""
    return [
        dict(
            instruction=f"Task {i}: describe item {i}.",
            input="" if i % 3 else f"item {i}",
            output=f"answer {i}",
            generator=generator,
        )
        for i in range(n)
    ]


def test_judge_prompt_shows_both_outputs_in_order_and_says_none_for_no_input():
    prompt = judging.judge_prompt(" Name a colour. ", "", " red ", "blue")
    assert "Name a colour." in prompt and "(none)" in prompt
    assert prompt.index("Output (a):\nred\n") < prompt.index("Output (b):\nblue\n")  # stripped, a before b


def test_parse_verdict_reads_labels_and_refuses_ambiguity():
    table = {
        "Output (a)": "a",
        "Output (b)": "b",
        "  **Output (B)**\n": "b",
        '"Output (a)"': "a",
        "b": "b",
        "(a).": "a",
        "I prefer Output (b) here.": "b",
        "Output (a) is better than Output (b)": "a",  # the label it opens with
        "A good answer would be Output (b)": "b",  # a leading 'A' is a word, not the label
        "Both are fine.": None,
        "I like Output (a) more than Output (b)": None,  # names both, opens with neither
        "": None,
    }
    assert {text: judging.parse_verdict(text) for text in table} == table


def test_preference_follows_the_shown_order():
    assert judging.preference("a", model_first=True) == judging.MODEL
    assert judging.preference("a", model_first=False) == judging.REFERENCE
    assert judging.preference("b", model_first=False) == judging.MODEL


def test_match_pairs_names_every_unmatched_and_repeated_row():
    model = task_rows(4, "m")
    reference = task_rows(5, "r")[1:]  # task 0 missing, task 4 extra
    with pytest.raises(ValueError) as err:
        judging.match_pairs(model + [model[1]], reference)
    msg = str(err.value)
    assert "--model_outputs row 0 has no match" in msg and "'Task 0: describe item 0.'" in msg
    assert "--reference_outputs row 3 has no match" in msg and "--model_outputs rows 1 and 4 are the same task" in msg
    # the input is part of the key: the same instruction with another input is another task
    other_input = [dict(r, input="something else") for r in model]
    with pytest.raises(ValueError, match="4 row"):
        judging.match_pairs(other_input[:2], model[:2])
    pairs = judging.match_pairs(model[::-1], model)  # reordered rows still pair up, in model_outputs' order
    assert (
        [m["instruction"] for m, r in pairs]
        == [r["instruction"] for m, r in pairs]
        == [r["instruction"] for r in model[::-1]]
    )


def test_win_rate_and_standard_error_by_hand():
    # 2 wins, 1 loss, 1 draw: mean of (1, 1, 0, 0.5) = 0.625; sample sd = sqrt(((.375^2)*2 + .625^2 + .125^2)/3)
    rate, se = judging.win_rate([2, 2, 1, 1.5])
    sd = np.sqrt((2 * 0.375**2 + 0.625**2 + 0.125**2) / 3)
    assert rate == pytest.approx(62.5) and se == pytest.approx(100 * sd / 2)


def test_length_controlled_rate_falls_toward_50_when_longer_always_wins():
    rng = np.random.default_rng(0)
    reference = rng.integers(100, 400, 300)
    model = reference + rng.normal(80, 120, 300).round().astype(int)  # the model is longer in about 3 of 4 pairs
    model[model == reference] += 1
    prefs = np.where(model > reference, 2.0, 1.0)  # the longer answer always wins
    rate, _ = judging.win_rate(prefs)
    lc, _, b1, _ = judging.length_controlled_win_rate(prefs, model, reference)
    assert rate > 70 and b1 > 0  # raw rate: the share of pairs where the model is longer
    assert abs(lc - 50) < (rate - 50) / 2  # removing the length effect takes more than half the lead away


def test_length_controlled_rate_keeps_a_lead_that_length_does_not_explain():
    rng = np.random.default_rng(1)
    reference = rng.integers(100, 400, 400)
    model = reference + rng.normal(0, 100, 400).round().astype(int)
    prefs = np.where(rng.random(400) < 0.7, 2.0, 1.0)  # wins 70% whatever the lengths
    rate, _ = judging.win_rate(prefs)
    lc, b0, b1, _ = judging.length_controlled_win_rate(prefs, model, reference)
    assert abs(lc - rate) < 3  # sigmoid(b0) ~ the raw rate when length has no effect
    # the fit is the optimum: the penalized log-loss gradient is zero there
    x, _ = judging.length_feature(model, reference)
    p = 1 / (1 + np.exp(-(b0 + b1 * x)))
    y = prefs - 1
    grad = [np.sum(p - y) + 1e-6 * b0, np.sum((p - y) * x) + 1.0 * b1]
    assert np.allclose(grad, 0, atol=1e-6)


def test_summarize_counts_failed_pairs_but_leaves_them_out_of_the_rates():
    annotations = [
        dict(output_1="r", output_2="mm", preference=2),  # a win
        dict(output_1="rr", output_2="m", preference=1),  # a loss
        dict(output_1="r", output_2="m", preference=None),  # failed: no parseable verdict
    ]
    s = judging.summarize(annotations)
    assert (s["pairs"], s["judged"], s["wins"], s["losses"], s["draws"], s["failed"]) == (3, 2, 1, 1, 0, 1)
    assert s["win_rate"] == 50  # 1 win of 2 judged pairs
    assert s["mean_length_model"] == pytest.approx(4 / 3)  # (2 + 1 + 1) / 3 characters, failed pair included
