"""serve.py: routes in process (httpx on the ASGI app), then its real uvicorn server (on a thread) driven by the
openai client, 50 concurrent requests and generate_instruction.py end to end. The model is tests/scripted_llama.py:
a real Llama checkpoint whose answer to any prompt is a known script, so answers can be compared exactly."""

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from helpers import ROOT, call_app, serve_in_thread, subprocess_env
from scripted_llama import SCRIPT, build_scripted_llama

from alpaca_trainml.generation.decoding import generation_limits
from alpaca_trainml.generation.llama_step import LlamaStep
from inference import InstructModel
from serve import create_app

ANSWER = "".join(SCRIPT)  # the scripted model's answer to any prompt
NAME = "scripted"  # --served_model_name in these tests


@pytest.fixture(scope="session")
def scripted_dir(tmp_path_factory, spm_tokenizer_dir):
    return build_scripted_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def model(scripted_dir):
    return InstructModel(str(scripted_dir))


call = call_app


def post(app, path, body, **kw):
    return call(app, ("POST", path, dict(json=body, **kw)))[0]


def events(text):
    """The JSON payloads of an SSE body, checking that it ends with [DONE]."""
    data = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# --- routes in process ------------------------------------------------------------------------
def test_instruct_route_health_models_and_ui(model):
    app = create_app(model, served_model_name=NAME)
    r1, r2, r3, r4, r5 = call(
        app,
        ("POST", "/instruct", dict(json={"instruction": "Name a bakery.", "temperature": 0})),
        ("POST", "/instruct", dict(json={"instruction": "Hi", "input": "x", "max_tokens": 1})),
        ("GET", "/health", {}),
        ("GET", "/v1/models", {}),
        ("GET", "/", {}),
    )
    assert r1.status_code == 200 and r1.json() == ANSWER.strip()  # a JSON string, as the trainML route answers
    assert r2.json() == SCRIPT[0].strip()
    assert r3.json()["status"] == "ok" and r3.json()["max_prompt_tokens"] == 512  # the default training length
    assert r4.json()["data"][0]["id"] == NAME
    assert r5.status_code == 200 and 'id="instruction"' in r5.text and 'id="error-bar"' in r5.text


def test_instruct_streams_server_sent_events(model):
    r = post(create_app(model), "/instruct", {"instruction": "Name a bakery.", "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert "".join(e["text"] for e in evs) == ANSWER.strip()
    assert evs[-1]["finish_reason"] == "stop" and evs[-1]["usage"]["completion_tokens"] == len(SCRIPT) + 1


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/instruct", b'{"instruction": "Hi",', 400, "malformed JSON body"),
        ("/instruct", {"input": "x"}, 400, "instruction: Field required"),
        ("/instruct", {"instruction": "   "}, 400, "instruction: String should match pattern"),
        (
            "/instruct",
            {"instruction": "Hi", "temperature": 3},
            400,
            "temperature: Input should be less than or equal to 2",
        ),
        ("/instruct", {"instruction": "Hi", "top_p": 0}, 400, "top_p: Input should be greater than 0"),
        (
            "/instruct",
            {"instruction": "Hi", "max_tokens": 0, "num_beams": 0},
            400,
            "max_tokens: Input should be greater than or equal to 1 (got 0); num_beams: Input should be greater than",
        ),
        (
            "/instruct",
            {"instruction": "Hi", "num_beams": 99},
            400,
            "num_beams: Input should be less than or equal to 8",
        ),
        ("/instruct", {"instruction": "Hi", "max_tokens": 2.5}, 400, "max_tokens: Input should be a valid integer"),
        ("/instruct", {"instruction": "Hi " * 600}, 400, "trained on at most 512"),
        ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 8192}, 400, "maximum context length is 8192"),
        ("/v1/completions", {"model": "gpt-4o", "prompt": "Hi"}, 404, "The model 'gpt-4o' does not exist"),
        ("/v1/completions", {"model": NAME, "prompt": "Hi", "n": 2}, 400, "n: Input should be less than or equal to 1"),
        (
            "/v1/chat/completions",
            {"model": NAME, "messages": [{"role": "assistant", "content": "x"}]},
            400,
            "last message",
        ),
    ],
)
def test_bad_input_gets_a_4xx_json_error(model, path, body, status, needle):
    kw = (
        dict(content=body, headers={"Content-Type": "application/json"}) if isinstance(body, bytes) else dict(json=body)
    )
    (r,) = call(create_app(model, served_model_name=NAME), ("POST", path, kw))
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_api_key_is_required_when_set(model):
    app = create_app(model, api_key="sekret")
    body = dict(json={"instruction": "Hi", "max_tokens": 1})
    none, wrong, right, health = call(
        app,
        ("POST", "/instruct", body),
        ("POST", "/instruct", dict(body, headers={"Authorization": "Bearer nope"})),
        ("POST", "/instruct", dict(body, headers={"Authorization": "Bearer sekret"})),
        ("GET", "/health", {}),
    )
    assert none.status_code == wrong.status_code == 401
    assert none.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200 and health.status_code == 200


def test_a_model_failure_is_a_500_json_error(model, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(model.model, "forward", broken)  # transformers' forward (the generic step)
    monkeypatch.setattr(LlamaStep, "prefill", broken)  # and our Llama step
    monkeypatch.setattr(LlamaStep, "kernel_step", broken)  # and its kernel's pass (fused.py's prompts go there)
    plain, streamed = call(
        create_app(model),
        ("POST", "/instruct", dict(json={"instruction": "Hi"})),
        ("POST", "/instruct", dict(json={"instruction": "Hi", "stream": True})),
    )
    assert plain.status_code == 500 and "out of memory, say" in plain.json()["error"]["message"]
    assert "out of memory, say" in events(streamed.text)[-1]["error"]["message"]  # headers were already sent


def test_a_full_queue_is_a_503_streaming_or_not(model):
    app = create_app(model, max_waiting=0)  # every request finds the queue full
    plain, streamed = call(
        app,
        ("POST", "/instruct", dict(json={"instruction": "Hi"})),
        ("POST", "/v1/completions", dict(json={"prompt": ["a", "b"], "stream": True})),
    )
    for r in (plain, streamed):
        assert r.status_code == 503 and "already waiting; retry later" in r.json()["error"]["message"]


def test_mixed_requests_share_decoding_steps_on_one_model_thread(model, monkeypatch):
    """Streaming and not, different temperatures, top_p, stops and max_tokens: all decode in shared steps, on the
    model thread only."""
    sizes, threads = [], set()
    real = LlamaStep.decode

    def tracked(self, ids):
        threads.add(threading.current_thread().name)
        sizes.append(ids.shape[0])  # rows in this decoding step
        time.sleep(0.01)  # hold the model a little, as a real one would, so that requests pile up
        return real(self, ids)

    monkeypatch.setattr(LlamaStep, "decode", tracked)

    def body(i):
        return {
            "instruction": f"Task {i}",
            "max_tokens": 2 + i % 3,
            "temperature": [0, 0.5, 1.0][i % 3],
            "top_p": [1.0, 0.9][i % 2],
            "stream": i % 2 == 0,
        }

    rs = call(create_app(model, max_batch_size=8), *[("POST", "/instruct", dict(json=body(i))) for i in range(24)])
    assert [r.status_code for r in rs] == [200] * 24
    texts = [r.json() if i % 2 else "".join(e["text"] for e in events(r.text)) for i, r in enumerate(rs)]
    # the scripted answer cut at each request's max_tokens (one script piece per token); streams keep trailing space
    assert [t.rstrip() for t in texts] == ["".join(SCRIPT[: 2 + i % 3]).strip() for i in range(24)]
    assert threads == {"model"}
    assert max(sizes) > 1 and max(sizes) <= 8  # batched, within --max_batch_size


def test_openai_routes_take_prompts_up_to_the_context_window(model, caplog):
    app = create_app(model, served_model_name=NAME)
    long = "Hi " * 600  # over the 512-token training length, well under the scripted model's 8192 window
    fits, chat, over, cut = call(
        app,
        ("POST", "/v1/completions", dict(json={"prompt": long, "max_tokens": 20, "temperature": 0})),
        ("POST", "/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": long}]})),
        ("POST", "/v1/completions", dict(json={"prompt": long, "max_tokens": 7800})),
        ("POST", "/v1/completions", dict(json={"prompt": long, "max_tokens": 7800, "truncate": True})),
    )
    assert fits.status_code == 200 and fits.json()["choices"][0]["text"] == ANSWER
    assert fits.json()["usage"]["prompt_tokens"] > 512
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == ANSWER.strip()
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 8192" in over.json()["error"]["message"]
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 8192 - 7800  # the room left
    assert "longer than the 512 this model was trained on" in caplog.text


def test_health_tells_the_limits_the_server_checks(model):
    (r,) = call(create_app(model), ("GET", "/health", {}))
    assert r.json()["limits"] == generation_limits(8192)  # the scripted model's context window
    assert r.json()["limits"]["max_tokens"] == {"default": 256, "min": 1, "max": 8192}


# --- safe by default --------------------------------------------------------------------------
def test_the_app_is_guarded(model):
    """http_guard's rules are in place (tests/test_http_guard.py tests them one by one)."""
    big = {"instruction": "x" * 2000}
    foreign, too_big = call(
        create_app(model, max_body_bytes=1000),
        ("GET", "/health", dict(headers={"Host": "evil.example"})),
        ("POST", "/instruct", dict(json=big)),
    )
    assert foreign.status_code == 403 and too_big.status_code == 413
    assert call(create_app(model, host="0.0.0.0"), ("GET", "/health", dict(headers={"Host": "my.lan"})))[0].is_success


def test_only_loopback_own_and_allowed_origins_may_call(model):
    def ask(app, origin, method="POST", host="localhost:8000"):
        headers = {"Origin": origin, "Host": host}
        if method == "OPTIONS":  # a CORS preflight
            headers |= {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
            return call(app, ("OPTIONS", "/instruct", dict(headers=headers)))[0]
        return call(app, ("POST", "/instruct", dict(json={"instruction": "Hi", "max_tokens": 1}, headers=headers)))[0]

    app = create_app(model)
    refused = ask(app, "https://evil.example")
    assert refused.status_code == 403 and "--allowed_origins https://evil.example" in refused.json()["error"]["message"]
    assert ask(app, "https://evil.example", "OPTIONS").status_code in (400, 403)  # no CORS grant
    assert ask(app, "null").status_code == 403  # a file:// page or a sandboxed frame
    own = ask(app, "http://localhost:8000")
    assert own.status_code == 200
    local = ask(app, "http://127.0.0.1:5173", "OPTIONS")
    assert local.status_code == 200 and local.headers["access-control-allow-origin"] == "http://127.0.0.1:5173"
    wider = create_app(model, allowed_origins=["https://app.example"])
    r = ask(wider, "https://app.example")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert ask(create_app(model, allowed_origins=["*"]), "https://anything.example").status_code == 200


# --- a real server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(scripted_dir, free_port_module):
    argv = [
        "--model_name_or_path",
        str(scripted_dir),
        "--port",
        str(free_port_module),
        "--served_model_name",
        NAME,
        "--max_prompt_tokens",
        "4096",
        "--log_level",
        "warning",
    ]
    with serve_in_thread(argv) as running:
        yield running.url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)


def test_openai_client_completions(client):
    r = client.completions.create(model=NAME, prompt=["1. Instruction:", "Anything"], max_tokens=20, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [ANSWER, ANSWER]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2 * (len(SCRIPT) + 1)
    r = client.completions.create(model=NAME, prompt="x", max_tokens=20, stop=["\n5. Input"])
    assert r.choices[0].text == ANSWER[: ANSWER.index("\n5. Input")] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=NAME, prompt="x", max_tokens=1)
    assert r.choices[0].text == SCRIPT[0] and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=NAME, prompt="x", max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_client_chat(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a bakery."}]
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0)
    assert r.choices[0].message.content == ANSWER.strip() and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=NAME, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER.strip()
    assert chunks[-1].usage.completion_tokens == len(SCRIPT) + 1


def test_unknown_model_is_a_404_for_the_openai_client(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])


def test_fifty_concurrent_requests(server):
    async def go():
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            bodies = [{"instruction": f"Task {i}", "max_tokens": 2, "temperature": 0.5} for i in range(50)]
            return await asyncio.gather(*(c.post("/instruct", json=b) for b in bodies))

    rs = asyncio.run(go())
    assert [r.status_code for r in rs] == [200] * 50
    assert {r.json() for r in rs} == {(SCRIPT[0] + SCRIPT[1]).strip()}
    assert httpx.get(f"{server}/health").json()["queued"] == 0


def test_generate_instruction_end_to_end(server, tmp_path):
    """generate_instruction.py talks to serve.py through the openai client and keeps the two scripted tasks."""
    if not (ROOT / "generate_instruction.py").exists():
        pytest.skip("generate_instruction.py is not in this checkout yet")
    out = tmp_path / "gen"
    cmd = [
        sys.executable,
        "-m",
        "generate_instruction",
        "generate_instruction_following_data",
        "--output_dir",
        str(out),
        "--base_url",
        f"{server}/v1",
        "--model_name",
        NAME,
        "--api",
        "chat",
        "--num_instructions_to_generate",
        "2",
        "--max_workers",
        "1",
        "--num_cpus",
        "1",
        "--seed",
        "0",
        "--export_alpaca",
        str(out / "alpaca_data.json"),
    ]
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads((out / "regen.json").read_text())
    assert [r["instruction"] for r in records] == [
        "Suggest a name for a bakery that sells only rye bread.",
        "Convert the temperature from Celsius to Fahrenheit.",
    ]
    rows = json.loads((out / "alpaca_data.json").read_text())
    assert rows[1] == {
        "instruction": "Convert the temperature from Celsius to Fahrenheit.",
        "input": "25 degrees Celsius",
        "output": "77 degrees Fahrenheit",
    }
    assert rows[0]["input"] == ""  # <noinput> becomes an empty input
