"""evaluate.py: judging against a scripted judge on loopback (tests/fake_openai.py) with injected 500s, 429s and
unparseable verdicts, draws, resume after kill -9, the CLI's messages, and `generate` with the tiny Llama. The verdict
parser and the statistics are tested directly in test_judging.py."""

import json
import re
import signal
import subprocess
import sys
import time

import helpers
import pytest
from fake_openai import FakeOpenAI
from helpers import ROOT, serve_in_thread, subprocess_env
from scripted_llama import build_scripted_llama

import evaluate
from alpaca_trainml.evaluation import judging

MARK = "[best]"  # the scripted judge prefers the output holding this


def shown_outputs(prompt):
    """(output_a, output_b) as the judge prompt shows them."""
    match = re.search(r"\nOutput \(a\):\n(.*)\n\nOutput \(b\):\n(.*)\n\nWhich output is better\?", prompt, re.S)
    return match.group(1), match.group(2)


def marker_judge(prompt, rng, chat, fault):
    """Answers the output holding MARK; the fault "garbled" answers something no parser can read."""
    if fault == "garbled":
        return "Both answers have merits; it depends.", "stop", []
    output_a, _ = shown_outputs(prompt)
    return ("Output (a)" if MARK in output_a else "Output (b)"), "stop", []


def always_a(prompt, rng, chat, fault):
    return "Output (a)", "stop", []


def outputs(n, marked, generator, identical=(), prefix="answer"):
    """n model_outputs rows; rows in `marked` hold MARK; rows in `identical` get the same text in both files."""
    return [
        dict(
            instruction=f"Task {i}: describe item {i}.",
            input="" if i % 3 else f"item {i}",
            output="shared answer" if i in identical else f"{prefix} {i}" + (f" {MARK}" if i in marked else ""),
            generator=generator,
        )
        for i in range(n)
    ]


def write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def judge(fake, tmp_path, model_rows, reference_rows, **kw):
    args = dict(base_url=fake.base_url, api_key="test-key", retry_base_s=0.01, max_workers=1, seed=0)
    evaluate.judge(
        write(tmp_path / "model.json", model_rows),
        write(tmp_path / "reference.json", reference_rows),
        "judge-model",
        tmp_path / "out",
        **{**args, **kw},
    )
    return json.loads((tmp_path / "out" / "annotations.json").read_text())


# ---------------------------------------------------------------------------------------------
# Judging against the scripted judge
def test_marker_judge_with_faults_gives_the_hand_computed_rate(free_port, tmp_path, capsys):
    n = 10
    model = outputs(n, marked={0, 1, 2, 4, 5, 8}, generator="tuned", identical={9})
    reference = outputs(n, marked={3, 6, 7}, generator="base", identical={9})
    # one worker, so the faults land in order: a 500 and a 429 are retried; the 2nd pair gets three unparseable
    # verdicts (1 ask + 2 re-asks) and fails; the 3rd pair gets one and then a good one
    faults = ["500", None, "429", "garbled", "garbled", "garbled", "garbled"]
    with FakeOpenAI(free_port, faults=faults, answer_fn=marker_judge) as fake:
        annotations = judge(fake, tmp_path, model, reference, verdict_retries=2)
    assert len(fake.log) == 9 + 2 + 2 + 1  # 9 pairs asked (not the identical one), 2 retried, 2 + 1 re-asked
    assert [e["body"].get("temperature") for e in fake.log[3:7]] == [0, 1.0, 1.0, 0]  # re-asks are sampled
    by_task = {a["instruction"]: a for a in annotations}
    failed = by_task["Task 1: describe item 1."]
    assert failed["status"] == "failed" and failed["preference"] is None and len(failed["raw_verdicts"]) == 3
    assert by_task["Task 9: describe item 9."]["status"] == "identical"
    assert by_task["Task 9: describe item 9."]["preference"] == 1.5
    # by hand: judged pairs 0, 2..8 and the draw 9. Model wins 0, 2, 4, 5, 8 (5), loses 3, 6, 7 (3), draw 9
    expected_rate = 100 * (5 + 0.5) / 9
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rate, se = judging.win_rate([2] * 5 + [1] * 3 + [1.5])
    assert rate == pytest.approx(expected_rate)
    lc = judging.summarize(annotations)["length_controlled_win_rate"]
    assert last == f"win_rate: {expected_rate:.1f}% ± {se:.1f} (length-controlled {lc:.1f}%), 10 pairs, 1 failed"
    # the order shown is recorded and the verdict reads through it
    for a in annotations:
        if a["status"] == "judged":
            shown_a = a["output_2"] if a["shown_first"] == "model" else a["output_1"]
            assert (a["raw_verdicts"][-1] == "Output (a)") == (MARK in shown_a)
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert f"| tuned | base | {expected_rate:.1f}% | {se:.1f} |" in board and "| 5 | 3 | 1 | 1 |" in board
    assert (tmp_path / "out" / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_judge_that_always_answers_a_gives_about_50_percent(free_port, tmp_path):
    n = 60
    with FakeOpenAI(free_port, answer_fn=always_a) as fake:
        annotations = judge(fake, tmp_path, outputs(n, (), "m"), outputs(n, (), "r", prefix="other"), max_workers=4)
    assert len(fake.log) == n
    shown_model_first = sum(a["shown_first"] == "model" for a in annotations)
    rate = judging.summarize(annotations)["win_rate"]
    assert rate == pytest.approx(100 * shown_model_first / n)  # exactly the pairs where the model was shown as (a)
    assert 35 <= rate <= 65  # the seeded coin: 60 flips at p = 0.5 land here with probability ~0.98


def test_identical_outputs_are_draws_without_asking(free_port, tmp_path):
    rows = outputs(5, (), "m")
    with FakeOpenAI(free_port, answer_fn=always_a) as fake:
        annotations = judge(fake, tmp_path, rows, [dict(r, generator="r") for r in rows])
    assert fake.log == [] and [a["preference"] for a in annotations] == [1.5] * 5
    assert judging.summarize(annotations)["win_rate"] == 50


def test_a_judge_that_is_down_or_unknown_is_named_with_its_url_and_flag(free_port, tmp_path):
    rows = outputs(2, (), "m")
    with pytest.raises(evaluate.UsageError, match=f"cannot reach http://127.0.0.1:{free_port}/v1: Connection refused"):
        judge(FakeOpenAI(free_port), tmp_path, rows, outputs(2, (), "r", prefix="other"))  # not started
    with FakeOpenAI(free_port, models=["served"]) as fake:
        with pytest.raises(evaluate.UsageError, match="404 for model 'judge-model' at .*Check --judge_model and"):
            judge(fake, tmp_path, rows, outputs(2, (), "r", prefix="other"))


def test_a_misspelled_field_in_an_outputs_file_is_named_with_the_real_one(tmp_path):
    from alpaca_trainml.evaluation import formats

    path = write(tmp_path / "m.json", [{"instruction": "x", "outptu": "y", "generator": "m"}])
    with pytest.raises(evaluate.UsageError) as e:
        formats.load_rows(path, "model_outputs", needs_output=True)
    assert str(e.value).splitlines()[1:] == [
        "  row 0: needs string field(s) instruction, output and an optional string 'input'",
        "  row 0: unknown field 'outptu' (did you mean output?)",
    ]


def test_generate_refuses_a_checkpoint_without_its_tokenizer_before_it_loads(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    import transformers

    (tmp_path / "m").mkdir()
    for name in ("config.json", "model.safetensors"):  # what model.save_pretrained alone writes
        shutil.copy(tiny_llama_dir / name, tmp_path / "m" / name)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail())
    with pytest.raises(evaluate.UsageError, match="m: not a complete checkpoint: no tokenizer"):
        evaluate.generate(
            write(tmp_path / "tasks.json", [{"instruction": "Say hi."}]), tmp_path / "out.json", tmp_path / "m"
        )


def test_the_outputs_get_the_modes_the_umask_gives(free_port, tmp_path):
    rows = outputs(3, {0}, "m")
    with FakeOpenAI(free_port, answer_fn=marker_judge) as fake, helpers.umask(0o022):
        judge(fake, tmp_path, rows, outputs(3, (), "r", prefix="other"))
    found = helpers.modes(tmp_path / "out")
    names = {p.rsplit("/", 1)[-1] for p in found}
    assert {"annotations.json", "leaderboard.md", "winrate.png"} <= names
    assert found == helpers.expected_modes(found, 0o022)  # files 0644, the folder 0755


def test_unmatched_rows_and_cli_mistakes_get_one_message_each(tmp_path):
    model = write(tmp_path / "m.json", outputs(3, (), "m"))
    reference = write(tmp_path / "r.json", outputs(3, (), "r")[:2])
    (tmp_path / "bad.json").write_text('[{"instruction": "x", ')
    write(tmp_path / "no_output.json", [{"instruction": "x"}])
    base = [sys.executable, "evaluate.py", "judge", "--judge_model", "j", "--output_dir", str(tmp_path / "o")]
    cases = {
        "--model_outputs row 2 has no match in --reference_outputs": [
            "--model_outputs",
            model,
            "--reference_outputs",
            reference,
        ],
        "no such file": ["--model_outputs", tmp_path / "nope.json", "--reference_outputs", reference],
        "not valid JSON": ["--model_outputs", tmp_path / "bad.json", "--reference_outputs", reference],
        "row 0: needs string field(s) instruction, output": [
            "--model_outputs",
            tmp_path / "no_output.json",
            "--reference_outputs",
            reference,
        ],
        "unknown flag --judge_modle (did you mean --judge_model?)": ["--judge_modle", "x"],
        "--max_workers 'many': expected an integer of at least 1": [
            "--model_outputs",
            model,
            "--reference_outputs",
            reference,
            "--max_workers",
            "many",
        ],
        "--api 'responses': expected completions or chat": [
            "--model_outputs",
            model,
            "--reference_outputs",
            reference,
            "--api",
            "responses",
        ],
    }
    generate = [sys.executable, "evaluate.py", "generate", "--output", str(tmp_path / "o" / "out.json")]
    write(tmp_path / "twice.json", [{"instruction": "Say hi."}, {"instruction": "Say hi.", "input": ""}])
    generate_cases = {  # all found before the model loads
        "--instructions rows 0 and 1 are the same task": ["--instructions", tmp_path / "twice.json"],
        "--eval_set rows 0 and 1 are the same task": ["--eval_set", tmp_path / "twice.json"],
        f"--instructions {tmp_path / 'nope.json'}: no such file": ["--instructions", tmp_path / "nope.json"],
        "--batch_size 0: expected an integer of at least 1": ["--instructions", model, "--batch_size", "0"],
        "unknown flag --max_new_tokens (did you mean --max_tokens?)": ["--max_new_tokens", "5"],
    }
    runs = [(base, needle, args) for needle, args in cases.items()]
    runs += [(generate, needle, args) for needle, args in generate_cases.items()]
    for command, needle, args in runs:
        proc = subprocess.run(
            command + [str(a) for a in args],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0 and needle in proc.stderr, (needle, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # every mistake is caught before anything is written


def test_kill_9_then_rerun_resumes_without_asking_again(free_port, tmp_path):
    n = 12
    model = write(tmp_path / "m.json", outputs(n, set(range(0, n, 2)), "m"))
    reference = write(tmp_path / "r.json", outputs(n, set(range(1, n, 2)), "r"))
    path = tmp_path / "out" / "annotations.json"
    cmd = [
        sys.executable,
        "evaluate.py",
        "judge",
        "--model_outputs",
        model,
        "--reference_outputs",
        reference,
        "--judge_model",
        "j",
        "--output_dir",
        tmp_path / "out",
        "--max_workers",
        "2",
    ]
    saved = lambda: len(json.loads(path.read_text())) if path.exists() else 0  # noqa: E731
    with FakeOpenAI(free_port, answer_fn=marker_judge, delay_s=0.2) as fake:
        cmd[cmd.index("--judge_model") : cmd.index("--judge_model")] = ["--base_url", fake.base_url]
        proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while saved() < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
        before, asked = json.loads(path.read_text()), len(fake.log)
        assert 4 <= len(before) < n
        done = subprocess.run(
            [str(c) for c in cmd], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr[-2000:]
    after = json.loads(path.read_text())
    assert len(after) == n and all(a in after for a in before)  # earlier verdicts kept as they were
    assert len(fake.log) - asked == n - len(before)  # the rerun asked only for the rest
    assert (
        done.stdout.strip().splitlines()[-1] == "win_rate: 50.0% ± 15.1 (length-controlled 50.0%), 12 pairs, 0 failed"
    )


# ---------------------------------------------------------------------------------------------
# generate, with the tiny Llama
def test_generate_writes_model_outputs_and_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    from alpaca_trainml.generation.engine import Engine

    rows = [{"instruction": f"Count the words in sentence {i}.", "input": "a b c" if i % 2 else ""} for i in range(5)]
    eval_set = write(tmp_path / "eval.json", rows)
    out = tmp_path / "outputs.json"
    submitted = []
    real_submit = Engine.submit

    def counting_submit(self, job):
        submitted.append(job)
        return real_submit(self, job)

    monkeypatch.setattr(Engine, "submit", counting_submit)
    evaluate.generate(eval_set=eval_set, output=out, model_name_or_path=str(tiny_llama_dir), max_tokens=4, batch_size=2)
    first = json.loads(out.read_text())
    assert len(submitted) == 5  # every row through the serving engine
    assert [(r["instruction"], r.get("input", "")) for r in first] == [(r["instruction"], r["input"]) for r in rows]
    # AlpacaEval's model_outputs fields; input only where there is one (AlpacaEval has no input field)
    assert [set(r) for r in first] == [
        {"instruction", "output", "generator"} | ({"input"} if i % 2 else set()) for i in range(5)
    ]
    assert {r["generator"] for r in first} == {tiny_llama_dir.name}  # the model folder's name
    write(out, first[:3])  # as if killed after 3 rows
    submitted.clear()
    evaluate.generate(instructions=eval_set, output=out, model_name_or_path=str(tiny_llama_dir), max_tokens=4)
    again = json.loads(out.read_text())
    assert len(submitted) == 2 and again[:3] == first[:3] and len(again) == 5  # only the 2 missing rows were generated
    assert again == first  # greedy: the engine's answers do not depend on which rows share a batch
    with pytest.raises(ValueError, match="not other's answers"):
        evaluate.generate(eval_set, out, model_name_or_path=str(tiny_llama_dir), generator="other")


def test_generate_reads_alpaca_eval_set_and_writes_its_reference(tiny_llama_dir, tmp_path):
    """AlpacaEval's alpaca_eval.json shape (instruction, output, generator, dataset): our own two rows, not its data."""
    rows = [
        dict(instruction="Name a colour.", output="Blue.", generator="gpt4_turbo", dataset="helpful_base"),
        dict(instruction="Add 2 and 3.", output="5", generator="gpt4_turbo", dataset="vicuna"),
    ]
    out, reference = tmp_path / "model_outputs.json", tmp_path / "reference_outputs.json"
    evaluate.generate(
        eval_set=write(tmp_path / "alpaca_eval.json", rows),
        output=out,
        reference_output=reference,
        model_name_or_path=str(tiny_llama_dir),
        generator="tiny",
        max_tokens=3,
    )
    answers = json.loads(out.read_text())
    assert [(r["instruction"], r["generator"], r["dataset"]) for r in answers] == [
        ("Name a colour.", "tiny", "helpful_base"),
        ("Add 2 and 3.", "tiny", "vicuna"),
    ]
    assert json.loads(reference.read_text()) == rows  # the eval set's answers, as AlpacaEval's reference_outputs


def test_winrate_scores_alpaca_eval_annotations(tmp_path, capsys):
    """alpaca_eval's annotations.json fields (preference 2 = output_2 won, 0 = draw, null = no verdict)."""
    rows = [
        dict(
            instruction=f"t{i}",
            output_1="ref",
            generator_1="gpt4",
            output_2="m" * (i + 1),
            generator_2="mine",
            annotator="my_judge",
            preference=p,
            raw_completion="x",
        )
        for i, p in enumerate([2.0, 1.0, 2.0, 0, None, 1.5])
    ]
    evaluate.winrate(write(tmp_path / "annotations.json", rows), tmp_path / "out")
    # judged: 2, 1, 2, draw, draw -> (1 + 0 + 1 + .5 + .5) / 5 = 60%; the null is a failed pair
    assert re.match(r"win_rate: 60\.0% .*, 6 pairs, 1 failed$", capsys.readouterr().out.strip())
    assert "| 2 | 1 | 2 | 1 |" in (tmp_path / "out" / "leaderboard.md").read_text()  # wins, losses, draws, failed
    assert "mine against gpt4" in (tmp_path / "out" / "leaderboard.md").read_text()
    bad = write(tmp_path / "bad.json", [dict(rows[0], preference=3)])
    with pytest.raises(ValueError, match="row 0: preference 3"):
        evaluate.winrate(bad, tmp_path / "out2")


def test_judge_through_serve_py(tmp_path, spm_tokenizer_dir):
    """serve.py as the judge, with a scripted tiny Llama that answers "Output (b)" to anything."""
    model_dir = build_scripted_llama(spm_tokenizer_dir, tmp_path / "judge", pieces=("Output (b)",))
    argv = ["--model_name_or_path", str(model_dir), "--port", str(helpers.free_port()), "--served_model_name", "j"]
    # --max_prompt_tokens: serve.py's OpenAI routes cap prompts at the training length (512) until issue 15 lands
    with serve_in_thread(argv + ["--log_level", "warning"]) as running:
        for api in ("chat", "completions"):
            rows = outputs(6, (), "m")
            evaluate.judge(
                write(tmp_path / "m.json", rows),
                write(tmp_path / "r.json", outputs(6, (), "r", prefix="other")),
                "j",
                tmp_path / api,
                base_url=f"{running.url}/v1",
                api=api,
            )
            annotations = json.loads((tmp_path / api / "annotations.json").read_text())
            assert [a["raw_verdicts"] for a in annotations] == [["Output (b)"]] * 6
            # (b) is the model exactly when the reference was shown first
            assert [a["preference"] for a in annotations] == [
                2.0 if a["shown_first"] == "reference" else 1.0 for a in annotations
            ]
