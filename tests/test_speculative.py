"""generation/speculative.py: prompt-lookup drafts, the acceptance rules, and speculative decoding in the decoder
core giving greedy output identical to plain decoding (end of text, stop strings and max_tokens inside a draft,
rows joining a running batch), and sampled tokens with the model's own distribution."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from alpaca_trainml.generation import speculative
from alpaca_trainml.generation.batch import DecodeBatch, Job
from alpaca_trainml.generation.speculative import Lookup, accept_greedy, accept_sampled, draft
from inference import GenParams, InstructModel

PROMPTS = [
    "Summarize the text. The river paints three apples and a long letter about the weather report.",
    "Repeat the input. the river the river the river the river the river",
    "Name the main subject.",
    "Why?",
]


def test_draft_takes_what_followed_the_latest_earlier_match_longest_first():
    ctx = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    assert draft(ctx, 3, max_ngram=2, min_ngram=1) == [2, 3, 6]  # "6 7" last seen before "2 3"
    assert draft(ctx, 3, max_ngram=3, min_ngram=3) == []  # "3 6 7" never came before
    assert draft([1, 2, 3, 1], 5) == [2, 3, 1]  # up to the end of the context
    assert draft([1, 2, 3, 1], 0) == [] and draft([4], 3) == []
    assert draft([256, 1, 9, 1], 2, max_ngram=1) == [9, 1]  # 1 = bytes 01 00 00 00: no match inside 256's bytes
    assert draft([1, 0, 0, 0, 7, 1], 1, max_ngram=1) == [0]  # token-aligned matches only


def test_a_longer_match_drafts_more_tokens():
    """Lookup.lengths: a match of n tokens drafts lengths[n - 1] (the last entry for longer ones), within k."""
    ctx = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3]  # "1 2 3" came before: a 3-token match
    assert draft(ctx, 8, lengths=(1, 4, 8)) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert draft(ctx, 5, lengths=(1, 4, 8)) == [4, 5, 6, 7, 8]  # k caps it
    assert draft(ctx, 8, lengths=(1, 4)) == [4, 5, 6, 7]  # longer than the table: its last entry
    assert draft([9, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], 8, lengths=(1, 4, 8)) == [4, 5, 6, 7]  # "2 3": 2 tokens
    assert draft([9, 3, 4, 5, 6, 7, 8, 1, 2, 3], 8, lengths=(1, 4, 8)) == [4]  # "3" alone: 1 token
    assert draft([9, 3, 4, 5, 6, 7, 8, 1, 2, 3], 8, min_ngram=2, lengths=(1, 4, 8)) == []


def test_a_one_token_match_drafts_only_for_a_lone_row():
    """A 1-token match is kept a quarter of the time: it drafts where the step's budget leaves a row its full
    Lookup.tokens (one row), not in a batch, where each drafted token costs compute."""
    lookup = Lookup()

    def row(ids):
        job = SimpleNamespace(ids=ids, grammar=None, params=GenParams(max_tokens=64, temperature=0))
        return SimpleNamespace(job=job, ids=[], made=1, context_window=2048)

    weak, strong = row([9, 3, 4, 5, 6, 7, 8, 1, 2, 3]), row([9, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3])
    assert speculative.step_drafts([weak], lookup) == [[4]]
    assert speculative.step_drafts([weak, strong], lookup) == [[], [4, 5, 6, 7]]  # 2 rows: 7 each, no 1-gram
    assert speculative.step_drafts([strong] * 4, lookup) == [[4, 5, 6]] * 4  # 16 // 4 - 1 = 3 each


def test_greedy_acceptance_keeps_the_prefix_the_model_agrees_with_then_its_own_token():
    logits = torch.nn.functional.one_hot(torch.tensor([4, 5, 9, 2]), 10).float()  # argmax 4, 5, 9, 2
    assert accept_greedy(logits, [4, 5, 6]) == [4, 5, 9]  # 6 rejected: the model's 9 instead
    assert accept_greedy(logits, [4, 5, 9]) == [4, 5, 9, 2]  # all kept, plus one more
    assert accept_greedy(logits[:1], []) == [4]  # no draft: plain decoding


def test_sampled_acceptance_keeps_the_models_distribution():
    """The first token from accept_sampled with a fixed draft is distributed as p, whatever the draft: the rule
    keeps t with p(t) and otherwise samples p without t. 6000 draws, each token within 4 standard errors."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = torch.stack([p, p])
    n = 6000
    for drafted in (0, 2, 3):  # a likely, an unlikely and a rare draft
        first = torch.tensor([accept_sampled(probs, [drafted], g)[0] for _ in range(n)])
        freq = torch.bincount(first, minlength=4).float() / n
        se = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() < 4 * se).all(), (drafted, freq)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return InstructModel(str(tiny_llama_dir))


def generate(model, lookup, prompts, params, **kw):
    model.speculative = lookup
    try:
        return model.generate([model.encode_instruction(p) for p in prompts], params, **kw)
    finally:
        model.speculative = None


@pytest.mark.parametrize(
    "lookup",
    [
        Lookup(),  # drafts by match length (1, 4, 8), 1-token matches included
        Lookup(tokens=3, max_ngram=2, min_ngram=1, lengths=(3,)),
        Lookup(tokens=16, lengths=(16,)),
        Lookup(tokens=4, min_ngram=2, lengths=(4,)),  # the setting before (4 tokens from matches of 2 or 3)
    ],
)
def test_greedy_output_is_identical_to_plain_decoding(model, lookup):
    params = GenParams(max_tokens=48, temperature=0)
    plain = generate(model, None, PROMPTS, params)
    spec = generate(model, lookup, PROMPTS, params)
    assert spec == plain  # text, token counts and finish reasons, row by row, in a batch of 4
    one = [generate(model, lookup, [p], params)[0] for p in PROMPTS]
    assert one == plain


def test_bf16_greedy_output_is_identical_to_plain_decoding(tiny_llama_dir):
    """bf16 verifies through the kernel's step (each draft position a row of it): plain decoding's numbers."""
    half = InstructModel(str(tiny_llama_dir), dtype="bfloat16")
    params = GenParams(max_tokens=32, temperature=0)
    assert generate(half, Lookup(), PROMPTS, params) == generate(half, None, PROMPTS, params)


def test_drafts_are_verified_and_accepted_on_the_way(model):
    """The tiny model repeats itself, so its own text drafts tokens it then agrees with: the identity above is not
    just plain decoding under another name."""
    model.speculative = Lookup()
    try:
        batch = DecodeBatch(model)
        jobs = [Job(model.encode_instruction(p), GenParams(max_tokens=48, temperature=0)) for p in PROMPTS]
        batch.admit(jobs)
        while batch.rows:
            batch.step()
    finally:
        model.speculative = None
    assert batch.drafted > 0 and 0 < batch.accepted <= batch.drafted


def test_a_verify_step_carries_at_most_its_budget_of_positions(model):
    """Lookup.positions caps the positions of a verify step over all its rows: a big batch decodes plainly."""
    model.speculative = Lookup(positions=12)
    try:
        for n in (1, 3, 12):
            batch, seen = DecodeBatch(model), []

            def verify(tokens, counts, seen=seen, verify=batch.stepper.verify):
                seen.append(counts)
                return verify(tokens, counts)

            batch.stepper.verify = verify
            prompts = [model.encode_instruction(PROMPTS[i % len(PROMPTS)]) for i in range(n)]
            batch.admit([Job(ids, GenParams(max_tokens=24, temperature=0)) for ids in prompts])
            while batch.rows:
                batch.step()
            assert all(sum(counts) <= 12 for counts in seen), seen
            assert all(len(counts) <= 6 for counts in seen)  # 7 rows x (pending + 1 drafted) is past 12: plain steps
            if n == 1:  # alone: the pending token and up to 8 drafted (Lookup.tokens), well within 12
                assert seen and max(max(c) for c in seen) > 4 >= 12 // 3  # more than 3 rows' share would allow
    finally:
        model.speculative = None


def test_max_tokens_stop_strings_and_end_of_text_inside_a_draft_end_the_row_as_plain_decoding_does(model):
    params = GenParams(max_tokens=48, temperature=0)
    full = generate(model, None, PROMPTS, params)
    for limit in (1, 2, 5, 13):  # max_tokens landing anywhere in a draft
        capped = replace(params, max_tokens=limit)
        assert generate(model, Lookup(), PROMPTS, capped) == generate(model, None, PROMPTS, capped)
    for text in (c.text for c in full if len(c.text) > 8):
        stop = text[len(text) // 2 : len(text) // 2 + 3]  # a string the answer reaches midway
        stopped = replace(params, stop=(stop,))
        spec = generate(model, Lookup(), PROMPTS, stopped)
        assert spec == generate(model, None, PROMPTS, stopped)
        assert any(c.finish_reason == "stop" and len(c.text) < len(t.text) for c, t in zip(spec, full))
    ended = [c for c in full if c.finish_reason == "stop"]  # end of text: covered when the tiny model emits it
    assert all(c.completion_tokens <= 48 for c in ended)


def test_streamed_text_and_rows_joining_a_running_batch_are_unchanged(model):
    params = GenParams(max_tokens=40, temperature=0)
    plain = generate(model, None, PROMPTS[:1], params)[0]
    pieces = []
    spec = generate(model, Lookup(), PROMPTS[:1], params, on_text=pieces.append)[0]
    assert spec == plain and "".join(pieces) == plain.text
    model.speculative = Lookup()
    try:  # rows of different lengths join one after another, as the engine admits them
        batch = DecodeBatch(model)
        jobs = [Job(model.encode_instruction(p), params) for p in PROMPTS]
        for job in jobs:
            batch.admit([job])
            batch.step()
        while batch.rows:
            batch.step()
    finally:
        model.speculative = None
    assert [j.future.result() for j in jobs] == generate(model, None, PROMPTS, params)


def second_tokens(model, ids, n, params):
    """n samples of (first, second) new token: the second is the first one a draft decides (the first comes from
    the prompt's prefill)."""
    pairs = []
    while len(pairs) < n:
        batch = DecodeBatch(model)
        batch.admit([Job(ids, params)])
        if not batch.rows or not draft(ids + batch.rows[0].ids, 1):
            continue  # ended at once, or a first token with no draft (unk, bos): not what is tested
        row = batch.rows[0]
        batch.step()
        assert batch.drafted == 1
        pairs.append((row.ids[0], row.ids[1] if len(row.ids) > 1 else model.eos_ids[0]))  # else: it ended the row
    return pairs


def z_scores(model, ids, pairs, temperature):
    """For `the second token is the drafted one` and `... is the model's likeliest`: (seen - expected) / sd under
    the model's own p(second | prompt, first), summed over the samples."""
    stats = torch.zeros(2, 3)  # rows: the two events; columns: seen, expected, variance
    for first, second in pairs:
        with torch.inference_mode():
            p = torch.softmax(model.model(torch.tensor([ids + [first]])).logits[0, -1].float() / temperature, -1)
        for k, token in enumerate((draft(ids + [first], 1)[0], int(p.argmax()))):
            q = float(p[token])
            stats[k] += torch.tensor([float(second == token), q, q * (1 - q)])
    return ((stats[:, 0] - stats[:, 1]) / stats[:, 2].sqrt()).tolist()


def test_sampled_tokens_keep_the_models_distribution_with_speculation(model, monkeypatch):
    """A prompt holding every token id once, so every sampled first token has a draft (the id after it); 300
    samples of the second token. Each event's count is within 4 standard deviations of what p gives; the same test
    with an acceptance rule that keeps every draft fails by far, so it has the power to see a wrong rule."""
    ids = list(range(3, len(model.tokenizer)))  # 0-2: unk, bos, eos
    params = GenParams(max_tokens=3, temperature=0.5, top_p=1.0)
    torch.manual_seed(0)
    model.speculative = Lookup(tokens=1, max_ngram=1, min_ngram=1)
    try:
        pairs = second_tokens(model, ids, 300, params)
        z = z_scores(model, ids, pairs, 0.5)
        print("z", z)
        assert all(abs(v) < 4 for v in z), z
        monkeypatch.setattr(speculative, "accept_sampled", lambda probs, drafted, generator=None: [*drafted, 3])
        wrong = z_scores(model, ids, second_tokens(model, ids, 50, params), 0.5)
    finally:
        model.speculative = None
    print("wrong", wrong)
    assert wrong[0] > 10  # every second token is the drafted one


def test_the_speculative_flag_values():
    assert speculative.lookup_for("none") is None and speculative.lookup_for("ngram") == Lookup()
    with pytest.raises(ValueError, match="none, ngram"):
        speculative.lookup_for("eagle")


def test_the_scripts_take_speculative_ngram_and_answer_the_same(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import evaluate
    import inference
    import serve
    from alpaca_trainml.cli import UsageError

    answers = []
    for mode in ("none", "ngram"):
        monkeypatch.setattr(inference, "_MODEL", None)
        argv = ["--model_name_or_path", str(tiny_llama_dir), "--instruction", PROMPTS[1], "--temperature", "0"]
        inference.main(inference.parse_args([*argv, "--max_tokens", "24", "--speculative", mode]))
        answers.append(capsys.readouterr().out)
        assert (inference.get_model().speculative is None) == (mode == "none")
    assert answers[0] == answers[1] and answers[0].strip()
    rows = [{"instruction": p, "input": ""} for p in PROMPTS]
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    outs = []
    for mode in ("none", "ngram"):
        out = tmp_path / f"{mode}.json"
        evaluate.generate(str(tmp_path / "eval.json"), str(out), str(tiny_llama_dir), max_tokens=24, speculative=mode)
        outs.append([r["output"] for r in json.loads(out.read_text())])
    assert outs[0] == outs[1]
    with pytest.raises(UsageError, match="speculative"):
        evaluate.generate(str(tmp_path / "eval.json"), str(out), str(tiny_llama_dir), speculative="eagle")
    args = serve.parse_args(["--model_name_or_path", str(tiny_llama_dir), "--speculative", "ngram"])
    model = InstructModel(str(tiny_llama_dir))
    serve.build_server(args, model=model)
    assert model.speculative == Lookup()


@pytest.mark.slow
def test_the_benchmark_runs_both_sides_and_finds_the_same_greedy_texts(tiny_llama_dir):
    import subprocess
    import sys

    from helpers import ROOT, subprocess_env

    argv = ["--model_name_or_path", str(tiny_llama_dir), "--tokens", "16", "--no_llama_cpp"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speculative", *argv],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    # grounded_prompts.json: 20 Alpaca rows with an input, 8 articles to summarise
    assert "alpaca_input" in last and "identical 20/20" in last and "identical 8/8" in last, last
    assert last.startswith("speculative: ngram over plain decode, batch 1")
    assert "alpaca_input: " in proc.stdout and "steps without a draft" in proc.stdout  # the drafts' distribution


def test_speculation_is_off_where_the_verify_step_would_not_match_plain_decoding(tiny_llama_dir, monkeypatch):
    half = InstructModel(str(tiny_llama_dir), dtype="bfloat16", speculative=Lookup())
    assert DecodeBatch(half).lookup == Lookup()  # bf16 on the kernel: verify is the kernel's decode step
    monkeypatch.setenv("ALPACA_MATVEC", "0")  # bf16 on torch's operations: verify rounds activations to bf16
    half = InstructModel(str(tiny_llama_dir), dtype="bfloat16", speculative=Lookup())
    assert DecodeBatch(half).lookup is None
    monkeypatch.delenv("ALPACA_MATVEC")
    monkeypatch.setenv("ALPACA_FAST_DECODE", "0")  # transformers' forward: no verify step
    assert DecodeBatch(InstructModel(str(tiny_llama_dir), speculative=Lookup())).lookup is None
    monkeypatch.delenv("ALPACA_FAST_DECODE")
    assert DecodeBatch(InstructModel(str(tiny_llama_dir), speculative=Lookup())).lookup == Lookup()


def test_the_draft_replay_keeps_what_plain_decoding_makes(tiny_llama_dir, capsys):
    """benchmarks/draft_replay.py replays each setting over plain answers; its tokens per step for the default must
    be those of the real speculative run (greedy keeps a drafted token exactly when plain decoding makes it)."""
    from benchmarks import draft_replay

    model = InstructModel(str(tiny_llama_dir))
    answers = draft_replay.plain_answers(model, [{"instruction": p} for p in PROMPTS], 24)
    t = draft_replay.replay(answers, Lookup(), 24, [1.0])
    model.speculative = Lookup()
    try:
        batches = []
        for ids, _ in answers:
            batch = DecodeBatch(model)
            batch.admit([Job(ids, GenParams(max_tokens=24, temperature=0))])
            steps = 1
            while batch.rows:
                batch.step()
                steps += 1
            batches.append((batch.drafted, batch.accepted, steps))
    finally:
        model.speculative = None
    assert (t["drafted"], t["kept"], t["steps"]) == tuple(map(sum, zip(*batches)))
    assert t["kept"] > 0  # the tiny model repeats itself: some drafts are kept
    draft_replay.main(draft_replay.parse_args(["--model_name_or_path", str(tiny_llama_dir), "--tokens", "8"]))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("draft_replay: ") and all(label in last for label in draft_replay.SETTINGS), last
