"""api_schema.py: what /openapi.json tells (every error, the model's limits, the served names), 405's Allow, and that
the server keeps what it tells: schemathesis (the OpenAPI fuzzer) runs every check over serve.py on the scripted
model and finds nothing. The same run by hand over the embedded model is in docs/operators.md."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, call_app, serve_in_thread, subprocess_env
from scripted_llama import build_scripted_llama

from alpaca_trainml.generation.batch import sample
from alpaca_trainml.generation.decoding import GenParams
from inference import InstructModel
from serve import create_app

CONTEXT = 256  # the scripted model's context window here: small, so that the fuzzer reaches its edge
NAME = "scripted"
TESTS = ROOT / "tests"


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory, spm_tokenizer_dir):
    return build_scripted_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("scripted"), context_window=CONTEXT)


@pytest.fixture(scope="module")
def model(scripted_dir):
    return InstructModel(str(scripted_dir))


call = call_app


def test_the_schema_declares_every_error_and_the_models_limits(model):
    (r,) = call(create_app(model, served_model_name=NAME, api_key="k"), ("GET", "/openapi.json", {}), generate=False)
    doc = r.json()
    post_errors = {"200", "400", "401", "403", "404", "413", "503"}  # api_schema.ROUTE_ERRORS["generate"]
    for path in ("/instruct", "/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == post_errors, path  # no FastAPI 422: a bad body is a 400, as OpenAI answers
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert "text/event-stream" in responses["200"]["content"]
        assert doc["paths"][path]["post"]["security"] == [{"bearer": []}]  # --api_key given
    assert set(doc["paths"]["/health"]["get"]["responses"]) == {"200", "403"}  # open, even with --api_key
    bodies = doc["components"]["schemas"]
    assert "HTTPValidationError" not in bodies
    text = str(doc)
    assert "x-max-tokens" not in text and "x-token-id" not in text and "x-model" not in text  # every marker filled
    max_tokens = bodies["CompletionBody"]["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens == {"type": "integer", "minimum": 1, "maximum": CONTEXT}
    token_ids = bodies["CompletionBody"]["properties"]["prompt"]["anyOf"][2]["items"]
    assert token_ids["maximum"] == model.vocab_size - 1 == len(model.tokenizer) - 1
    assert bodies["ChatBody"]["properties"]["model"]["anyOf"][0]["enum"] == [NAME]
    assert bodies["InstructBody"]["properties"]["num_beams"]["anyOf"][0] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 8,
    }


def test_max_model_len_serves_a_smaller_context_window(scripted_dir):
    app = create_app(InstructModel(str(scripted_dir)), max_model_len=64)  # its own model: create_app narrows it
    health, doc, over = call(
        app,
        ("GET", "/health", {}),
        ("GET", "/openapi.json", {}),
        ("POST", "/v1/completions", dict(json={"prompt": "Hi", "max_tokens": 64})),
    )
    assert health.json()["context_window"] == 64 and health.json()["max_prompt_tokens"] == 64
    assert doc.json()["components"]["schemas"]["InstructBody"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 64
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"


def test_405_says_which_methods_the_path_takes(model):
    answers = call(
        create_app(model),
        ("POST", "/health", {}),
        ("GET", "/instruct", {}),  # the web UI's files, mounted at /, would say 404
        ("PUT", "/v1/completions", {}),
        ("DELETE", "/index.html", {}),
        generate=False,
    )
    assert [(r.status_code, r.headers.get("allow")) for r in answers] == [
        (405, "GET"),
        (405, "POST"),
        (405, "POST"),
        (405, "GET, HEAD"),
    ]
    assert answers[0].json()["error"]["code"] == 405


def test_token_id_prompts_and_empty_prompts_are_answered(model):
    ids = model.encode("Once upon a time")
    body = dict(max_tokens=2, temperature=0)
    bad_id = model.vocab_size
    answers = call(
        create_app(model),
        *[
            ("POST", "/v1/completions", dict(json=dict(body, prompt=prompt)))
            for prompt in ["", [], [[]], ids, [ids, ids[:2]], [bad_id]]
        ],
    )
    for r in answers[:5]:
        assert r.status_code == 200, r.text
    assert answers[0].json()["usage"]["prompt_tokens"] == 1  # "" starts from the beginning-of-text token
    assert answers[3].json()["usage"]["prompt_tokens"] == len(ids)
    assert len(answers[4].json()["choices"]) == 2
    assert answers[5].status_code == 400 and answers[5].json()["error"]["code"] == "invalid_token_id"
    assert f"[{bad_id}]" in answers[5].json()["error"]["message"]


def test_a_tiny_temperature_in_a_beam_search_is_no_500(model):
    ids = model.encode("Hi")  # found by the fuzzer on the embedded model: 1e-300 made transformers' logits inf
    (answer,) = model.generate([ids], GenParams(max_tokens=3, temperature=1e-300, num_beams=2))
    assert answer.text and answer.completion_tokens <= 3


def test_a_top_p_that_is_zero_in_float32_keeps_the_likeliest_token():
    import torch

    logits = torch.tensor([[0.0, 3.0, 1.0]])
    picked = sample(logits, torch.tensor([1.0]), torch.tensor([5e-324]))  # found by the fuzzer: a 500 for the batch
    assert picked.tolist() == [1]


# docs/operators.md gives this command; the tests run it, on their server's port and with fewer examples
FUZZ = (
    "SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH=tests st --config-file tests/schemathesis.toml run "
    "http://127.0.0.1:8000/openapi.json --checks all --phases examples,coverage,fuzzing,stateful "
    "--max-response-time 300 --request-timeout 300"
)


def schemathesis(url, phases, max_examples, tmp_path):
    """Run FUZZ (the schemathesis CLI, every check and our own in tests/schemathesis_hooks.py) over the server at
    url; its output, having checked that it exited 0."""
    words = shlex.split(
        FUZZ.replace("http://127.0.0.1:8000", url).replace("examples,coverage,fuzzing,stateful", phases)
    )
    hooks = dict(w.split("=", 1) for w in words[:2])["SCHEMATHESIS_HOOKS"]
    command = [str(Path(sys.executable).parent / "st"), *words[3:], "--max-examples", str(max_examples)]
    command += ["--seed", "1", "--generation-database", "none", "--no-color", "--output-sanitize", "false"]
    env = subprocess_env(SCHEMATHESIS_HOOKS=hooks, PYTHONPATH=f"{ROOT}:{TESTS}")  # PYTHONPATH=tests, absolute
    command += ["--report", "ndjson", "--report-dir", str(tmp_path)]  # not into the checkout
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    return done.stdout


def scripted_adapter(scripted_dir, out):
    """A LoRA adapter on the scripted model (peft's default init: B is zero, so it answers the script too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(scripted_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(scripted_dir).save_pretrained(out)
    return out


def fuzz(scripted_dir, port, phases, max_examples, tmp_path, caplog):
    pytest.importorskip("schemathesis")
    argv = ["--model_name_or_path", str(scripted_dir), "--port", str(port), "--served_model_name", NAME]
    # an adapter served beside it, and the runtime load/unload routes: fuzzed too
    adapter = scripted_adapter(scripted_dir, tmp_path / "adapter")
    argv += ["--lora_modules", f"{NAME}-lora={adapter}", "--allow_runtime_lora_updating"]
    with caplog.at_level("ERROR"), serve_in_thread(argv + ["--log_level", "warning"]) as running:
        out = schemathesis(running.url, phases, max_examples, tmp_path)
        after = httpx.post(f"{running.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert after.status_code == 200  # and the server answers normally afterwards
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no traceback in its log
    generated = int(re.search(r"(\d+) generated", out).group(1))
    return out, generated


def test_schemathesis_finds_nothing(scripted_dir, free_port, tmp_path, caplog):
    out, generated = fuzz(scripted_dir, free_port, "examples,fuzzing", 8, tmp_path, caplog)
    assert generated >= 20 and f"{generated} passed" in out  # 7 operations, up to 8 each, and the examples


@pytest.mark.slow
def test_schemathesis_finds_nothing_in_every_phase(scripted_dir, free_port, tmp_path, caplog):
    out, generated = fuzz(scripted_dir, free_port, "examples,coverage,fuzzing,stateful", 30, tmp_path, caplog)
    assert generated >= 300 and f"{generated} passed" in out  # the coverage phase alone makes hundreds
