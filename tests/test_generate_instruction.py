"""generate_instruction.py and self_instruct/generate.py: the options check, regen.json, the request layer against
a scripted OpenAI-compatible server (tests/fake_openai.py) with injected faults, and runs of the real script with
kill -9. The prompt, parsing and filters are tested in test_prompting.py, the ROUGE-L dedup in test_rouge_dedup.py."""

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import helpers
import pytest
from fake_openai import FakeOpenAI
from helpers import ROOT, serve_in_thread, subprocess_env
from scripted_llama import build_scripted_llama

from alpaca_trainml.data import dataset
from alpaca_trainml.self_instruct import generate as gi
from alpaca_trainml.self_instruct import prompting as self_instruct
from alpaca_trainml.self_instruct import rouge_dedup

K = 3  # example tasks per prompt, the original's default


def test_records_holding_the_prompts_scaffolding_are_dropped_and_counted():  # the rule: test_prompting.py
    # what a weak local teacher sent (issue 15): its own numbering inside one task
    leaked = {
        "instruction": "1. Instruction: Write a story about a person who is a hero.\n2. Input:\n<noinput>",
        "input": "",
        "output": "Once upon a time.",
    }
    in_output = {"instruction": "Explain why the sky is blue.", "input": "", "output": "Light.\n7. Output: again"}
    plain = {"instruction": "Explain why leaves turn red.", "input": "", "output": "Step 1. Pigments change."}
    stats, records = Counter(), []
    gi.add_response([leaked, in_output, plain], rouge_dedup.RougeLDeduper(["Name a colour."]), records, stats)
    assert [r["instruction"] for r in records] == [plain["instruction"]]
    assert gi.drop_counts(stats) == {"scaffolding": 2}  # listed in the summary with the other filters


GOOD_OPTIONS = dict(
    temperature=1.0,
    top_p=1.0,
    request_timeout=120.0,
    retry_base_s=1.0,
    max_retries=6,
    max_workers=4,
    request_batch_size=5,
    max_tokens=3072,
    num_cpus=1,
    num_instructions_to_generate=10,
)


def test_check_options_collects_every_problem_and_checks_the_api_once():
    assert gi.check_options("auto", "gpt-4o-mini", 175, 3, **GOOD_OPTIONS) == "chat"
    bad = dict(GOOD_OPTIONS, max_workers=0, max_tokens="lots", temperature=True)
    with pytest.raises(ValueError) as err:
        gi.check_options("responses", "gpt-4o-mini", 175, 19, **bad)
    msg = str(err.value)
    assert msg.count("--api 'responses'") == 1 and "--num_prompt_instructions 19: expected 1..18" in msg
    assert "--max_workers 0: expected an integer of at least 1" in msg and "--max_tokens 'lots'" in msg
    assert "--temperature True: expected a number from 0 to 2" in msg  # fire reads a bare --temperature as True


def test_load_regen_names_a_damaged_file_and_export_alpaca_writes_plain_rows(tmp_path):
    regen = tmp_path / "regen.json"
    regen.write_text('[{"instruction": "x"')
    with pytest.raises(ValueError, match=f"{regen}: not valid JSON"):
        gi.load_regen(regen)
    regen.write_text(
        json.dumps(
            [
                {
                    "instruction": "Add 2 and 3.",
                    "input": "",
                    "output": "5",
                    "most_similar_instructions": {"a": 0.1},
                    "avg_similarity_score": 0.1,
                }
            ]
        )
    )
    gi.export_alpaca(regen, tmp_path / "alpaca.json")
    assert json.loads((tmp_path / "alpaca.json").read_text()) == [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    ]


# ---------------------------------------------------------------------------------------------
# The request layer against the scripted server, in this process
SEEDS = [{"instruction": f"Describe item number {i} in detail.", "input": "", "output": f"Item {i}."} for i in range(K)]
PROMPT = self_instruct.encode_prompt(SEEDS)


def make_requester(fake, model, api="auto", **kw):
    client, _ = gi.make_client(fake.base_url, "test-key", 10)
    return gi.Requester(client, gi.choose_api(api, model), model, K, auto=api == "auto", retry_base_s=0.01, **kw)


def test_completions_batch_one_request_and_context_errors_shrink_max_tokens(free_port):
    with FakeOpenAI(free_port, context_max_tokens=2000) as fake:
        results, usage = make_requester(fake, "text-davinci-003")([PROMPT, PROMPT])
    assert [e["body"]["max_tokens"] for e in fake.log] == [3072, 2457, 1965]  # int(x * 0.8) until <= 2000
    body = fake.log[-1]["body"]
    assert fake.log[-1]["path"] == "/v1/completions" and body["prompt"] == [PROMPT, PROMPT]  # both prompts, one request
    assert body["stop"] == ["\n20", "20.", "20."] and body["n"] == 1
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0
    assert body["logit_bias"] == {"50256": -100}  # text-davinci-003 uses the GPT-2 vocabulary
    assert len(results) == 2 and usage.total_tokens > 0
    # the server sent tasks 4..19; every fifth (5, 10, 15) is one the filters drop
    assert len(self_instruct.post_process_gpt3_response(K, results[0])) == 16 - 3


def test_a_single_completions_prompt_goes_as_a_string_and_max_tokens_is_the_flag(free_port):
    with FakeOpenAI(free_port) as fake:
        (result,), _ = make_requester(fake, "my-local-model", api="completions", max_tokens=700)([PROMPT])
    body = fake.log[0]["body"]
    assert body["prompt"] == PROMPT and body["max_tokens"] == 700  # a string: `transformers serve` refuses a list
    assert "logit_bias" not in body and result["finish_reason"] == "stop"


def test_chat_strips_the_echoed_header_and_sends_no_logit_bias(free_port):
    with FakeOpenAI(free_port) as fake:
        requester = make_requester(fake, "gpt-4o-mini")
        (result,), _ = requester([PROMPT])
    body = fake.log[0]["body"]
    assert fake.log[0]["path"] == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": PROMPT}]
    assert "logit_bias" not in body and body["stop"] == ["\n20", "20.", "20."] and body["max_tokens"] == 3072
    kept = self_instruct.post_process_gpt3_response(K, result)
    assert [r["instruction"] for r in kept] == [
        i for i in fake.log[0]["instructions"][0] if self_instruct.rejection_reason(i) is None
    ]


def test_auto_switches_to_completions_when_the_server_has_no_chat_route(free_port):
    with FakeOpenAI(free_port, routes=("completions",)) as fake:
        requester = make_requester(fake, "my-local-model")
        (result,), _ = requester([PROMPT])
    assert [e["path"] for e in fake.log] == ["/v1/chat/completions", "/v1/completions"]
    assert requester.api == "completions" and "logit_bias" not in fake.log[1]["body"]
    assert len(self_instruct.post_process_gpt3_response(K, result)) == 13  # tasks 4..19 less the 3 filtered


# ---------------------------------------------------------------------------------------------
# The real script, as a subprocess, against the scripted server
def script(fake, out_dir, *args):
    return [
        sys.executable,
        "-m",
        "generate_instruction",
        "generate_instruction_following_data",
        "--output_dir",
        str(out_dir),
        "--base_url",
        fake.base_url,
        "--api_key",
        "test-key",
        "--retry_base_s",
        "0.05",
        "--seed",
        "0",
        *map(str, args),
    ]


def run_script(fake, out_dir, *args):
    return subprocess.run(
        script(fake, out_dir, *args), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def sent_instructions(fake):
    return {i for e in fake.log for batch in e["instructions"] for i in batch}


def test_end_to_end_completions_writes_regen_and_a_train_ready_export(free_port, tmp_path):

    with FakeOpenAI(free_port) as fake:
        proc = run_script(
            fake,
            tmp_path,
            "--model_name",
            "text-davinci-003",
            "--num_instructions_to_generate",
            30,
            "--request_batch_size",
            2,
            "--max_workers",
            2,
            "--export_alpaca",
            tmp_path / "alpaca.json",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "regen.json").read_text())
    assert len(records) >= 30 and len({r["instruction"] for r in records}) == len(records)
    assert all(
        list(r) == ["instruction", "input", "output", "most_similar_instructions", "avg_similarity_score"]
        for r in records
    )
    assert all(
        0 < len(r["most_similar_instructions"]) <= 10
        and max(r["most_similar_instructions"].values()) <= 0.7
        and 0 <= r["avg_similarity_score"] <= 0.7
        for r in records
    )
    assert {r["instruction"] for r in records} <= sent_instructions(fake)
    assert all(self_instruct.rejection_reason(r["instruction"]) is None for r in records)
    assert all(
        e["path"] == "/v1/completions" and len(e["body"]["prompt"]) == 2 and e["body"]["logit_bias"] == {"50256": -100}
        for e in fake.log
    )
    rows = dataset.load_rows(tmp_path / "alpaca.json")  # raises on anything train.py would reject
    assert rows == [{k: r[k] for k in ("instruction", "input", "output")} for r in records]
    assert re.search(
        r"done: \d+ requests .*kept \d+, dropped \d+ \(blocklist \d+, length \d+, program \d+", proc.stderr
    )


def test_fault_injection_retries_drops_and_keeps_going(free_port, tmp_path):
    faults = ["429", "500", "slow", "malformed", "length"]
    with FakeOpenAI(free_port, faults=faults, slow_s=12) as fake:
        proc = run_script(
            fake,
            tmp_path,
            "--model_name",
            "fake-chat",
            "--num_instructions_to_generate",
            20,
            "--max_workers",
            1,
            "--request_timeout",
            5,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log, err = fake.log, proc.stderr
    assert [e["fault"] for e in log[:5]] == faults
    # 429, 500 and the timeout: the same prompt is sent again, after a logged backoff
    assert log[0]["body"] == log[1]["body"] == log[2]["body"] == log[3]["body"]
    assert "RateLimitError (429); retry 1/6" in err and "InternalServerError (500); retry 2/6" in err
    assert "APITimeoutError (no status); retry 3/6" in err
    # malformed text: the request counts, nothing is kept from it
    assert re.search(r"request 1 \(1 prompt\): [\d.]+ s, \d+ tokens; kept 0; dropped malformed 1", err)
    # finish_reason "length": the last task is dropped, the complete ones before it are kept
    records = {r["instruction"] for r in json.loads((tmp_path / "regen.json").read_text())}
    *complete, last = log[4]["instructions"][0]
    assert last not in records and last in sent_instructions(fake)
    assert {i for i in complete if self_instruct.rejection_reason(i) is None} <= records
    assert re.search(
        r"request 2 \(1 prompt\): .*kept 12; dropped .*truncated 1", err
    )  # tasks 4..18 less 5, 10, 15 (filtered)


def test_bad_api_key_fails_fast_without_retrying(free_port, tmp_path):
    with FakeOpenAI(free_port, faults=["401"]) as fake:
        proc = run_script(fake, tmp_path, "--model_name", "fake-chat", "--max_workers", 1)
    assert proc.returncode == 2 and "401" in proc.stderr and "OPENAI_API_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr and "generate_instruction.py: error: " in proc.stderr
    assert len(fake.log) == 1 and not (tmp_path / "regen.json").exists()


def wait_for(condition, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def test_kill_9_at_several_points_then_resume_loses_nothing_saved_and_duplicates_nothing(free_port, tmp_path):
    regen = tmp_path / "regen.json"

    def mtime():
        return regen.stat().st_mtime_ns if regen.exists() else 0

    def temp_file():
        return any(tmp_path.glob(".regen.json.*.tmp"))

    with FakeOpenAI(free_port, delay_s=0.3) as fake:  # 0.3 s per answer, so kills land while requests are in flight
        cmd = script(
            fake, tmp_path, "--model_name", "fake-chat", "--num_instructions_to_generate", 100, "--max_workers", 2
        )
        kill_points = {  # name -> (condition on the server log length at start and regen.json's mtime at start)
            "first request in flight": lambda n0, m0: len(fake.log) >= n0 + 1,
            "right after a save": lambda n0, m0: mtime() != m0,
            "while regen.json is being written (or after a few requests)": lambda n0, m0: (
                temp_file() or len(fake.log) >= n0 + 4
            ),
            "two requests in": lambda n0, m0: len(fake.log) >= n0 + 2,
        }
        saved = []
        for name, condition in kill_points.items():
            n0, m0 = len(fake.log), mtime()
            with open(tmp_path / "killed.log", "w") as out:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=out, stderr=out)
                try:
                    wait_for(lambda c=condition, n=n0, m=m0, p=proc: c(n, m) or p.poll() is not None, name)
                finally:
                    proc.kill()  # SIGKILL; a no-op if the run already ended
                    proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL, (
                f"{name}: the run ended before the kill:\n" + (tmp_path / "killed.log").read_text()[-2000:]
            )
            now = json.loads(regen.read_text()) if regen.exists() else []  # never half a file
            assert now[: len(saved)] == saved, f"{name}: saved records changed"
            if name == "right after a save":
                assert len(now) > len(saved)  # what was saved before the kill survives it
            saved = now
        done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(regen.read_text())
    assert final[: len(saved)] == saved and len(final) >= 100
    assert len({r["instruction"] for r in final}) == len(final)  # no duplicates across the restarts
    assert {r["instruction"] for r in final} <= sent_instructions(fake)  # every record is one the server sent, intact
    assert f"{len(saved)} instructions from an earlier run" in done.stderr


# ---------------------------------------------------------------------------------------------
# Real servers with the scripted tiny Llama (tests/scripted_llama.py): whatever the prompt, it answers SCRIPT, which
# after "4. Instruction:" parses as these two tasks.
SCRIPTED_TASKS = [
    "Suggest a name for a bakery that sells only rye bread.",
    "Convert the temperature from Celsius to Fahrenheit.",
]


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory, spm_tokenizer_dir):
    from transformers import AutoTokenizer

    path = build_scripted_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("scripted"))
    tok = AutoTokenizer.from_pretrained(path)  # a plain chat template, so that peer servers can serve chat
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(path)
    return path


def generate_against(base_url, model_name, api, out_dir):
    gi.generate_instruction_following_data(
        output_dir=out_dir,
        base_url=base_url,
        api_key="unused",
        model_name=model_name,
        api=api,
        num_instructions_to_generate=2,
        request_batch_size=1,  # one prompt: sent as a string
        max_workers=1,
        num_cpus=1,
        seed=0,
        max_tokens=256,
        request_timeout=300,
    )
    return [r["instruction"] for r in json.loads((out_dir / "regen.json").read_text())]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_against_serve_py(scripted_model, api, tmp_path):
    # --max_prompt_tokens: serve.py's OpenAI routes cap prompts at the training length (512) until they take the
    # context window (issue 15); our prompt of 3 seed tasks is longer than that in the test tokenizer's tokens
    argv = [
        "--model_name_or_path",
        str(scripted_model),
        "--port",
        str(helpers.free_port()),
        "--served_model_name",
        "scripted",
    ]
    with serve_in_thread(argv + ["--log_level", "warning"]) as running:
        assert generate_against(f"{running.url}/v1", "scripted", api, tmp_path) == SCRIPTED_TASKS


@pytest.mark.slow  # a second process that imports torch: minutes on a busy 2-core machine
def test_against_transformers_serve_as_a_peer_server(scripted_model, tmp_path):
    """HF's own OpenAI-compatible server (transformers' `transformers serve`, offline, CPU) with the same model."""
    import httpx

    port = helpers.free_port()
    exe = Path(sys.executable).parent / "transformers"
    cmd = [str(exe), "serve", str(scripted_model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(cmd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: server.poll() is not None or healthy(httpx, port), "transformers serve", timeout=600)
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        for api in ("chat", "completions"):  # the model name is the path it was started with
            out = tmp_path / api
            assert generate_against(f"http://127.0.0.1:{port}/v1", str(scripted_model), api, out) == SCRIPTED_TASKS
    finally:
        server.terminate()
        server.wait(timeout=60)


def healthy(httpx, port):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
