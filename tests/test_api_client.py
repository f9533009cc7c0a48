"""api_client.py: the server's own reason in errors, one prompt sent as a string, per-request overrides, and the
chat hook, the fail-fast and bounded retry rules, and the API chosen from the model name."""

import pytest
from fake_openai import FakeOpenAI

from alpaca_trainml.self_instruct import api_client


def requester(fake, api, model="fake-model", **kw):
    client, _ = api_client.make_client(fake.base_url, "test-key", 10)
    return api_client.Requester(client, api, model, 50, retry_base_s=0.01, **kw)


def echo(prompt, rng, chat, fault):
    return f"you said: {prompt}", "stop", []


def test_a_refusal_outside_openais_error_shape_keeps_the_servers_reason(free_port):
    # FastAPI apps such as `transformers serve` answer {"detail": ...}; the openai client's text drops it
    with FakeOpenAI(free_port, faults=["400"], answer_fn=echo) as fake:
        with pytest.raises(api_client.FatalRequestError) as err:
            requester(fake, "completions")(["hello"])
    assert str(err.value) == f"{fake.base_url} refused the request (400): prompt must be a string."


def test_server_message_reads_every_body_shape():
    class Err(Exception):
        def __init__(self, body, text=""):
            self.body, self.response = body, type("R", (), {"text": text})()

    assert api_client.server_message(Err({"message": "bad model", "code": "x"})) == "bad model"
    assert api_client.server_message(Err({"detail": "prompt must be a string."})) == "prompt must be a string."
    assert api_client.server_message(Err({"error": "overloaded"})) == "overloaded"
    assert api_client.server_message(Err("Bad Gateway\n")) == "Bad Gateway"
    assert api_client.server_message(Err(None, "plain text body")) == "plain text body"


def test_one_prompt_is_a_string_several_are_a_list_and_overrides_last_one_request(free_port):
    with FakeOpenAI(free_port, answer_fn=echo) as fake:
        ask = requester(fake, "completions", temperature=0)
        (one,), _ = ask(["hi"], temperature=1.0)
        two, _ = ask(["a", "b"])
    assert [e["body"]["prompt"] for e in fake.log] == ["hi", ["a", "b"]]
    assert [e["body"]["temperature"] for e in fake.log] == [1.0, 0]  # the override was for one request only
    assert one["text"] == "you said: hi" and [r["text"] for r in two] == ["you said: a", "you said: b"]


def test_chat_sends_one_user_message_and_applies_the_hook(free_port):
    class Upper(api_client.Requester):
        def chat_text(self, text):
            return text.upper()

    with FakeOpenAI(free_port, answer_fn=echo) as fake:
        client, _ = api_client.make_client(fake.base_url, "k", 10)
        (result,), usage = Upper(client, "chat", "fake-model", 50, logit_bias={"1": -100})(["hi"])
    assert fake.log[0]["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert "logit_bias" not in fake.log[0]["body"]  # token ids of one vocabulary: completions only
    assert result == {"text": "YOU SAID: HI", "finish_reason": "stop"} and usage.total_tokens > 0
    with pytest.raises(ValueError, match="expected one of completions, chat"):
        api_client.Requester(client, "responses", "m", 50)


def test_choose_api_from_the_model_name_and_the_gpt2_vocabulary_check():
    table = {
        "gpt-4o-mini": "chat",
        "gpt-5": "chat",
        "o3-mini": "chat",
        "meta-llama/Llama-3.1-8B-Instruct": "chat",
        "smollm2": "chat",
        "text-davinci-003": "completions",
        "gpt-3.5-turbo-instruct": "completions",
        "davinci-002": "completions",
        "openai-community/gpt2": "completions",
    }
    assert {m: api_client.choose_api("auto", m) for m in table} == table
    assert api_client.choose_api("completions", "gpt-4o-mini") == "completions"
    with pytest.raises(ValueError, match="expected auto, completions or chat"):
        api_client.choose_api("responses", "gpt-4o-mini")
    # token 50256 is <|endoftext|> only in the GPT-2/GPT-3 vocabularies; in cl100k (davinci-002) it is a word piece
    assert [
        api_client.uses_gpt2_tokenizer(m) for m in ("text-davinci-003", "gpt2-xl", "davinci-002", "gpt-4o-mini")
    ] == [
        True,
        True,
        False,
        False,
    ]


def test_unknown_model_and_403_fail_fast_and_retries_are_bounded_with_growing_backoff(free_port, monkeypatch):
    with FakeOpenAI(free_port, models=["served-model"]) as fake:
        with pytest.raises(api_client.FatalRequestError, match="404 for model 'no-such-model'.*--model_name"):
            requester(fake, "chat", model="no-such-model")(["Say hi."])
    assert len(fake.log) == 1  # no retry
    with FakeOpenAI(free_port, faults=["403"]) as fake:
        with pytest.raises(api_client.FatalRequestError, match=f"403: {fake.base_url} rejected the API key"):
            requester(fake, "chat")(["Say hi."])
    assert len(fake.log) == 1
    delays = []
    monkeypatch.setattr(api_client.time, "sleep", delays.append)
    with FakeOpenAI(free_port, faults=["500"] * 9) as fake:
        with pytest.raises(api_client.FatalRequestError, match="gave up after 4 attempts"):
            requester(fake, "chat", max_retries=3)(["Say hi."])
    assert len(fake.log) == 4  # 1 try + 3 retries
    for i, delay in enumerate(delays):  # base 0.01 s * 2**i, with jitter in [0.5, 1.5)
        assert 0.01 * 2**i * 0.5 <= delay < 0.01 * 2**i * 1.5


def test_the_server_is_checked_once_at_the_start_and_named_when_it_fails(free_port):
    import socket
    import time

    from alpaca_trainml.cli import UsageError

    url = f"http://127.0.0.1:{free_port}/v1"
    start = time.monotonic()
    with pytest.raises(UsageError) as e:  # nothing listens: refused at once, not after minutes of retries
        api_client.make_client(url, "k", 600)
    assert str(e.value) == f"cannot reach {url}: Connection refused; start the server or fix --base_url"
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", free_port))
        silent.listen()
        with pytest.raises(UsageError, match=f"^{url}: no answer within 0.5 s; is the server up"):
            api_client.check_server(api_client.make_client(url, "k", 600, check=False)[0], timeout=0.5)
    assert time.monotonic() - start < 10  # the bound; refused is instant and the silent one waits 0.5 s
    for status, needle in [
        (401, f"{url}: 401, the server rejected the API key"),
        (404, f"{url}/models: 404, not an OpenAI-compatible API; --base_url usually ends in /v1"),
    ]:
        with FakeOpenAI(free_port, models_status=status):
            with pytest.raises(UsageError, match="^" + needle):
                api_client.make_client(url, "k", 600)
    with FakeOpenAI(free_port) as fake:  # a working server: one GET, no request sent
        api_client.make_client(url, "k", 600)
    assert fake.log == []


def test_errors_during_a_run_name_the_url_and_the_flag_of_the_model(free_port):
    with FakeOpenAI(free_port, models=["served-model"]) as fake:
        with pytest.raises(api_client.FatalRequestError) as e:
            requester(fake, "chat", model="judge-x", model_flag="--judge_model")(["Say hi."])
    assert f"404 for model 'judge-x' at {fake.base_url}" in str(e.value) and "Check --judge_model and" in str(e.value)
