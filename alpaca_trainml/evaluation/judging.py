"""Pairwise judging as AlpacaEval does it: the judge prompt, reading a verdict, pairing two model_outputs files, and
the statistics (win rate, its standard error, the length-controlled win rate). No I/O; evaluate.py runs it.

Preferences use AlpacaEval's values: 1 = output_1 (the reference) is better, 2 = output_2 (the model), 1.5 = a draw.
"""

import math
import re

import numpy as np

from alpaca_trainml.cli import UsageError

REFERENCE, MODEL, DRAW = 1.0, 2.0, 1.5

JUDGE_PROMPT = """You are judging two answers to the same request. Prefer the answer that follows the instruction \
more exactly and is more correct, helpful and clear. Do not prefer an answer for being longer, or for coming first.

Instruction:
{instruction}

Input:
{input}

Output (a):
{output_a}

Output (b):
{output_b}

Which output is better? Answer with exactly "Output (a)" or "Output (b)" and nothing else."""


def judge_prompt(instruction, input_text, output_a, output_b):
    return JUDGE_PROMPT.format(
        instruction=instruction.strip(),
        input=input_text.strip() or "(none)",
        output_a=output_a.strip(),
        output_b=output_b.strip(),
    )


def parse_verdict(text):
    """'a', 'b' or None for a judge's answer.

    The label it opens with ("Output (b)", "**Output (a)**", "(b)", a bare "a"), else the one label it names
    anywhere ("I prefer Output (b)."); an answer that names both labels, or neither, is None."""
    t = (text or "").strip().strip("*\"'`# ").lower()
    head = re.match(r"output\s*\(\s*([ab])\s*\)", t)
    if head:
        return head.group(1)
    bare = re.fullmatch(r"\(?([ab])\)?[.!]?", t)
    if bare:
        return bare.group(1)
    named = set(re.findall(r"output\s*\(\s*([ab])\s*\)", t))
    return named.pop() if len(named) == 1 else None


def preference(verdict, model_first):
    """AlpacaEval's preference for a verdict on a pair shown as (a) = model if model_first, else (a) = reference."""
    model_won = (verdict == "a") == model_first
    return MODEL if model_won else REFERENCE


def pair_key(row):
    """Rows of two files are the same task when instruction and input are equal (AlpacaEval has no input: '')."""
    return row["instruction"], row.get("input") or ""


def repeated_tasks(rows, flag):
    """A message for every row that repeats an earlier row's task: pairing by task needs each task once."""
    seen, problems = {}, []
    for i, row in enumerate(rows):
        if pair_key(row) in seen:
            problems.append(f"{flag} rows {seen[pair_key(row)]} and {i} are the same task: {short(row)}")
        seen.setdefault(pair_key(row), i)
    return problems


def match_pairs(model_rows, reference_rows):
    """[(model_row, reference_row)] in model_rows' order. ValueError naming every unmatched or repeated task."""
    problems = repeated_tasks(model_rows, "--model_outputs") + repeated_tasks(reference_rows, "--reference_outputs")
    reference = {pair_key(r): r for r in reference_rows}
    model_keys = {pair_key(r) for r in model_rows}
    for i, row in enumerate(model_rows):
        if pair_key(row) not in reference:
            problems.append(f"--model_outputs row {i} has no match in --reference_outputs: {short(row)}")
    for i, row in enumerate(reference_rows):
        if pair_key(row) not in model_keys:
            problems.append(f"--reference_outputs row {i} has no match in --model_outputs: {short(row)}")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UsageError(
            f"{len(problems)} row(s) cannot be paired (pairs match on instruction and input):\n  "
            + "\n  ".join(problems[:20])
            + more
        )
    return [(row, reference[pair_key(row)]) for row in model_rows]


def short(row, width=60):
    text = " ".join(row["instruction"].split())
    shown = repr(text if len(text) <= width else text[:width] + "...")
    return shown + (f" (input {row['input'][:30]!r})" if row.get("input") else "")


# ---------------------------------------------------------------------------------------------
# Statistics
def win_rate(preferences):
    """(win rate %, standard error %) of the model: the mean of preference - 1 (a draw counts half), and its
    standard error of the mean (ddof 1, as AlpacaEval's pandas .sem()). nan for no pairs (se: fewer than 2)."""
    y = np.asarray(preferences, dtype=np.float64) - 1
    if y.size == 0:
        return math.nan, math.nan
    se = y.std(ddof=1) / math.sqrt(y.size) if y.size > 1 else math.nan
    return 100 * y.mean(), 100 * se


def length_feature(model_lengths, reference_lengths):
    """tanh of the length difference (model - reference) over its standard deviation: AlpacaEval 2.0's feature."""
    diff = np.asarray(model_lengths, dtype=np.float64) - np.asarray(reference_lengths, dtype=np.float64)
    scale = diff.std(ddof=1) if diff.size > 1 else 0.0
    return np.tanh(diff / scale) if scale > 0 else np.zeros_like(diff), scale


def fit_logistic(x, y, l2=1.0, steps=100):
    """(b0, b1) of P(model wins) = sigmoid(b0 + b1 * x), by Newton's method on the log-loss with soft labels y in
    [0, 1] (a draw is 0.5), plus l2/2 * b1**2.

    The ridge on b1 (sklearn's default strength, C=1) keeps the fit finite when the length alone separates wins from
    losses; b0, the answer we read, gets only a 1e-6 ridge so that all-wins stays finite too."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1)  # (n, 2)
    ridge = np.array([1e-6, l2])
    w = np.zeros(2)

    def loss(w):
        z = design @ w
        return np.sum(np.logaddexp(0, z) - y * z) + 0.5 * np.sum(ridge * w**2)

    for _ in range(steps):
        p = 1 / (1 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + ridge * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + np.diag(ridge)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while loss(w - t * step) > loss(w) and t > 1e-8:  # damped Newton: never increase the loss
            t /= 2
        w = w - t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(preferences, model_lengths, reference_lengths):
    """AlpacaEval 2.0's length-controlled win rate %: the logistic model of the preference on the length feature,
    read off at zero length difference, 100 * sigmoid(b0). Without AlpacaEval's instruction-difficulty term, which is
    fitted once over a whole leaderboard of models; with one model against one reference it cannot be estimated.

    Returns (percent, b0, b1, scale): scale = the standard deviation of the length difference (characters)."""
    y = np.asarray(preferences, dtype=np.float64) - 1
    if y.size == 0:
        return math.nan, math.nan, math.nan, 0.0
    x, scale = length_feature(model_lengths, reference_lengths)
    b0, b1 = fit_logistic(x, y)
    return 100 / (1 + math.exp(-b0)), b0, b1, scale


def summarize(annotations):
    """The leaderboard's numbers from annotation rows (output_1 = reference, output_2 = model, preference or None)."""
    judged = [a for a in annotations if a["preference"] is not None]
    prefs = [a["preference"] for a in judged]
    model_len = [len(a["output_2"]) for a in judged]
    reference_len = [len(a["output_1"]) for a in judged]
    rate, se = win_rate(prefs)
    lc, b0, b1, scale = length_controlled_win_rate(prefs, model_len, reference_len)
    return dict(
        pairs=len(annotations),
        judged=len(judged),
        wins=sum(p == MODEL for p in prefs),
        losses=sum(p == REFERENCE for p in prefs),
        draws=sum(p == DRAW for p in prefs),
        failed=len(annotations) - len(judged),
        win_rate=rate,
        standard_error=se,
        length_controlled_win_rate=lc,
        length_fit=dict(b0=b0, b1=b1, scale=scale),
        mean_length_model=float(np.mean([len(a["output_2"]) for a in annotations])) if annotations else math.nan,
        mean_length_reference=float(np.mean([len(a["output_1"]) for a in annotations])) if annotations else math.nan,
    )
