"""metrics.py: serve.py's /metrics, read back with prometheus_client's own text parser after a few requests on the
scripted model (tests/scripted_llama.py), whose answers' token counts are known from their usage."""

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scripted_llama import build_scripted_llama

from inference import InstructModel
from serve import create_app

NAME = "scripted"


@pytest.fixture(scope="module")
def model(tmp_path_factory, spm_tokenizer_dir):
    return InstructModel(str(build_scripted_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("scripted"))))


def call(app, requests, then=(), headers=None):
    """Send the requests concurrently, then the `then` ones in turn (the scrape), to the app in process."""

    async def go():
        app.state.engine.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=60, headers=headers
            ) as client:
                first = await asyncio.gather(*(client.request(m, p, **kw) for m, p, kw in requests))
                return first + [await client.request(m, p, **kw) for m, p, kw in then]
        finally:
            app.state.engine.stop()

    return asyncio.run(go())


def samples(text):
    """{(sample name, sorted labels): value} from the Prometheus text format."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_tokens_latencies_reasons_and_errors(model):
    generate = [
        ("POST", "/v1/completions", dict(json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})),
        ("POST", "/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "Hi"}], "stream": True})),
        ("POST", "/instruct", dict(json={"instruction": "Name a bakery."})),
    ]
    refused = [
        ("POST", "/v1/completions", dict(json={"prompt": "Hi", "max_tokens": 0})),  # 400
        ("POST", "/v1/completions", dict(json={"prompt": "Hi", "model": "gpt-4o"})),  # 404
    ]
    answers = call(create_app(model, served_model_name=NAME), generate + refused, then=[("GET", "/metrics", {})])
    completion, chat, instruct, bad, unknown, scraped = answers
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    got = samples(scraped.text)
    m = (("model_name", NAME),)
    usage = completion.json()["usage"]
    assert completion.json()["choices"][0]["finish_reason"] == "length"  # 2 pieces of the script, then cut
    # the chat's and /instruct's usage: the chat streams (no usage asked), so count from the same scripted answer
    n_instruct_prompt = len(model.encode_instruction("Name a bakery."))
    n_chat_prompt = len(model.encode_instruction("Hi"))
    assert got[("vllm:prompt_tokens_total", m)] == usage["prompt_tokens"] + n_chat_prompt + n_instruct_prompt
    assert got[("vllm:prefix_cache_queries_total", m)] == got[("vllm:prompt_tokens_total", m)]
    assert 0 <= got[("vllm:prefix_cache_hits_total", m)] < got[("vllm:prefix_cache_queries_total", m)]
    scripted = 4  # the script's 3 pieces, then end-of-text: each unconstrained answer makes 4 tokens
    assert got[("vllm:generation_tokens_total", m)] == 2 + scripted + scripted
    finished = (("finished_reason", "length"), *m), (("finished_reason", "stop"), *m)  # labels sorted by name
    assert got[("vllm:request_success_total", finished[0])] == 1
    assert got[("vllm:request_success_total", finished[1])] == 2
    assert got[("vllm:time_to_first_token_seconds_count", m)] == 3
    assert got[("vllm:e2e_request_latency_seconds_count", m)] == 3
    assert got[("vllm:inter_token_latency_seconds_count", m)] == (2 - 1) + (scripted - 1) * 2  # gaps between tokens
    assert got[("vllm:num_requests_running", m)] == 0 and got[("vllm:num_requests_waiting", m)] == 0
    http = {k[1]: v for k, v in got.items() if k[0] == "http_requests_total"}
    assert http[(("handler", "/v1/completions"), ("method", "POST"), ("status", "400"))] == 1
    assert http[(("handler", "/v1/completions"), ("method", "POST"), ("status", "404"))] == 1
    assert http[(("handler", "/v1/completions"), ("method", "POST"), ("status", "200"))] == 1
    assert bad.status_code == 400 and unknown.status_code == 404 and chat.status_code == instruct.status_code == 200


def test_metrics_follow_the_api_key(model):
    app = create_app(model, api_key="sekret")
    none, right = call(
        app, [("GET", "/metrics", {})], then=[("GET", "/metrics", dict(headers={"Authorization": "Bearer sekret"}))]
    )
    assert none.status_code == 401 and right.status_code == 200
    assert "vllm:num_requests_running" in right.text
