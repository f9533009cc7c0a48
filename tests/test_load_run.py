"""benchmarks/load_run.py: the request mix, the contract checks on answers, and (slow) a short real run against
serve.py in its own process with a client killed mid-stream."""

import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from benchmarks.load_run import KINDS, SCHEMA, broken_json, percentile, request_for
from tests import helpers

ARGS = SimpleNamespace(max_tokens=8, adapter_names=["a", "b"])


def test_every_kind_of_request_is_built_for_its_route():
    rng = random.Random(0)
    for kind in KINDS + ["adapter", "json_object", "json_schema"]:
        for _ in range(20):
            path, body = request_for(kind, rng, ARGS)
            assert path in ("/v1/completions", "/v1/chat/completions")
            if kind == "bad_body":
                assert isinstance(body, tuple)
                continue
            assert ("messages" in body) == (path == "/v1/chat/completions")
            assert body.get("stream", False) == kind.endswith("stream")
            assert (body.get("model") in ARGS.adapter_names) == (kind == "adapter")
            assert ("response_format" in body) == kind.startswith("json")


def test_json_answers_are_checked_against_the_schema():
    assert broken_json("json_schema", '{"name": "x", "count": 2}', "stop") is None
    assert "does not validate" in broken_json("json_schema", '{"name": "x"}', "stop")
    assert "not JSON" in broken_json("json_object", '{"name": ', "stop")
    assert broken_json("json_object", '{"name": ', "length") is None  # a cut answer may be incomplete
    assert broken_json("chat", "not json at all", "stop") is None
    assert set(SCHEMA["required"]) == {"name", "count"}


def test_percentiles():
    values = list(range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0


@pytest.mark.slow
def test_a_short_load_run_with_a_killed_client_finds_no_server_error(bpe_tokenizer_dir, tmp_path):
    model = helpers.build_tiny_llama(bpe_tokenizer_dir, tmp_path / "model")  # its tokenizer can spell JSON
    cmd = "python -m benchmarks.load_run --clients 4 --duration 15 --max_tokens 8 --kill_one --adapters 2 --json"
    argv = [sys.executable, *cmd.split()[1:], "--model_name_or_path", str(model)]
    out = subprocess.run(
        argv, cwd=helpers.ROOT, env=helpers.subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "the server answered 200" in lines[-2]
    assert "+1 killed" in lines[-1] and "0 5xx, 0 failed, 0 broken, 0 log errors" in lines[-1], out.stdout
    assert "bad_body" in out.stdout and "adapter" in out.stdout  # 4 clients for 15 s send every kind at least once
