"""serve.py over time: at start, an incomplete checkpoint, a port in use and a misspelled flag are refused before the
model loads; clients that leave stop costing the model, and SIGTERM ends running requests within seconds, on a thread
of this process and (slow) on a real `python serve.py` process. The model is tests/scripted_llama.py's, re-wired to
answer without end."""

import gc
import json
import logging
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from helpers import ROOT, subprocess_env
from scripted_llama import SCRIPT, build_scripted_llama

from alpaca_trainml import cli
from alpaca_trainml.generation import serve_command
from inference import InstructModel
from serve import ServerThread

NAME = "scripted"


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory, spm_tokenizer_dir):
    return build_scripted_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def endless(scripted_dir):
    """The scripted model, re-wired so that after the script's last piece comes its first again, never the end of
    text: it answers until max_tokens. Each step sleeps 5 ms, so 8,000 tokens take 40 s or more."""
    m = InstructModel(str(scripted_dir))
    head = m.model.lm_head.weight
    first = m.tokenizer.convert_tokens_to_ids(SCRIPT[0])
    with torch.no_grad():  # build_scripted_llama: the last piece's state is basis vector len(SCRIPT)
        head[first] += head[m.tokenizer.eos_token_id]
        head[m.tokenizer.eos_token_id] = 0
    real = m.model.forward

    def slow(*a, **kw):
        time.sleep(0.005)
        return real(*a, **kw)

    m.model.forward = slow
    return m


@pytest.fixture
def endless_server(endless, free_port):
    from serve import build_server, parse_args

    args = parse_args(["--port", str(free_port), "--served_model_name", NAME, "--log_level", "warning"])
    with ServerThread(build_server(args, model=endless)) as running:
        yield running


def wait_until(check, timeout=30):
    """Poll check() until it holds; a bound for slow machines, not a speed target."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_clients_that_leave_stop_costing_the_model(endless_server):
    url, engine = endless_server.url, endless_server.server.engine
    body = {"prompt": "x", "max_tokens": 8000}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s and closes the connection
        httpx.post(f"{url}/v1/completions", json=body, timeout=2)
    wait_until(lambda: engine.running() == 0)  # gone long before its 8,000 tokens (40 s or more)
    with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True), timeout=30) as r:
        next(r.iter_lines())
        assert engine.running() == 1
    wait_until(lambda: engine.running() == 0)


def test_a_client_that_leaves_mid_generation_is_one_info_line(endless_server, caplog):
    """A cancelled request is normal: one INFO line per request, no asyncio "Future exception was never retrieved"
    ERROR for the RequestCancelled the engine sets once the request has left."""
    url, engine = endless_server.url, endless_server.server.engine
    body = {"prompt": "x", "max_tokens": 8000}
    with caplog.at_level(logging.INFO):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s and closes the connection
            httpx.post(f"{url}/v1/completions", json=body, timeout=2)
        with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True), timeout=30) as r:
            next(r.iter_lines())  # a stream, left after its first event
        wait_until(lambda: engine.running() == 0 and engine.queued() == 0)
        wait_until(lambda: sum("the client left" in r.getMessage() for r in caplog.records) == 2)
        time.sleep(0.5)  # the engine's RequestCancelled reaches the event loop's futures
        gc.collect()  # an unread future exception is logged when the future is collected
    left = [r for r in caplog.records if "the client left" in r.getMessage()]
    assert [r.levelno for r in left] == [logging.INFO, logging.INFO]  # one per request
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_sigterm_ends_running_requests_within_seconds(endless_server):
    url, engine = endless_server.url, endless_server.server.engine
    body = {"prompt": "x", "max_tokens": 8000}
    plain = {}
    thread = threading.Thread(target=lambda: plain.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
    thread.start()
    with httpx.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True), timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        wait_until(lambda: engine.running() == 2)
        endless_server.stop(timeout=15)  # what `python serve.py` does on SIGTERM: Server.handle_exit
        rest = [line for line in lines if line.startswith("data: ")]
    thread.join(15)
    assert json.loads(rest[-2][len("data: ") :])["error"]["message"].startswith("the server is shutting down")
    assert rest[-1] == "data: [DONE]"
    assert plain["r"].status_code == 503 and "shutting down" in plain["r"].json()["error"]["message"]


@pytest.mark.slow
def test_sigterm_stops_a_real_serve_process(spm_tokenizer_dir, tmp_path, free_port):
    """`python serve.py` in its own process: SIGTERM during a long stream ends it with an error event and the
    process exits, instead of waiting for the 60,000 tokens asked for."""
    import os
    import signal

    folder = build_scripted_llama(spm_tokenizer_dir, tmp_path / "endless", context_window=65536)
    m = InstructModel(str(folder))
    head = m.model.lm_head.weight
    with torch.no_grad():  # as the endless fixture: after the last piece comes the first again
        head[m.tokenizer.convert_tokens_to_ids(SCRIPT[0])] += head[m.tokenizer.eos_token_id]
        head[m.tokenizer.eos_token_id] = 0
    m.model.save_pretrained(folder)
    url = f"http://127.0.0.1:{free_port}"
    cmd = [sys.executable, "serve.py", "--model_name_or_path", str(folder), "--port", str(free_port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is None and _up(url), timeout=600)  # a fresh process imports torch: minutes
        body = {"prompt": "x", "max_tokens": 60000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(proc.pid, signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        proc.wait(timeout=30)  # uvicorn's own backstop is 5 s (timeout_graceful_shutdown)
        assert "the server is shutting down" in rest[-2] and rest[-1] == "data: [DONE]"
        assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url):
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# --- at start ----------------------------------------------------------------------------------
def test_a_missing_incomplete_or_broken_checkpoint_is_one_clear_message(tmp_path, capsys, scripted_dir, monkeypatch):
    import shutil

    from alpaca_trainml import cli
    from serve import main, parse_args

    broken = tmp_path / "broken"
    shutil.copytree(scripted_dir, broken)
    (broken / "config.json").write_text("{")
    no_tokenizer = tmp_path / "no_tokenizer"  # what model.save_pretrained alone writes
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(scripted_dir / name, no_tokenizer / name)
    cases = [
        (tmp_path / "missing", "no such folder"),
        (broken, "not a valid JSON file"),
        (no_tokenizer, "not a complete checkpoint: no tokenizer (tokenizer.json or tokenizer.model"),
    ]
    for path, needle in cases:
        with pytest.raises(SystemExit) as e:
            cli.run("serve.py", main, parse_args(["--model_name_or_path", str(path), "--port", "0"]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("serve.py: error: ") and str(path) in err and needle in err
        assert len(err.strip().splitlines()) == 1


def test_a_port_in_use_is_refused_before_the_model_loads(scripted_dir, monkeypatch):
    import socket

    import serve
    from alpaca_trainml import cli

    monkeypatch.setattr(serve_command, "build_server", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = serve.parse_args(["--model_name_or_path", str(scripted_dir), "--port", str(port)])
        with pytest.raises(cli.UsageError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use; stop"):
            serve.main(args)


def test_the_port_is_taken_before_the_model_loads_and_handed_to_uvicorn(scripted_dir, monkeypatch, free_port):
    import socket

    import serve

    seen = {}

    class FakeServer:
        def run(self, sockets):
            seen["sockets"] = sockets

    def build_server(args):  # the model would load here: the port must already be ours
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", free_port))
        return FakeServer()

    monkeypatch.setattr(serve_command, "build_server", build_server)
    serve.main(serve.parse_args(["--model_name_or_path", str(scripted_dir), "--port", str(free_port)]))
    (sock,) = seen["sockets"]
    assert sock.getsockname() == ("127.0.0.1", free_port)
    sock.close()


def test_a_misspelled_flag_is_named_with_the_real_one(capsys):
    from serve import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--model_name_or_pth", "x"])
    assert e.value.code == 2
    assert "unknown flag(s): --model_name_or_pth (did you mean --model_name_or_path?)" in capsys.readouterr().err


def test_a_negative_prefix_cache_is_one_usage_error_before_the_model_loads(scripted_dir, monkeypatch):
    import serve

    monkeypatch.setattr(serve_command, "build_server", lambda args: pytest.fail("the model must not load"))
    args = serve.parse_args(["--model_name_or_path", str(scripted_dir), "--prefix_cache_mb", "-1"])
    with pytest.raises(cli.UsageError, match="--prefix_cache_mb -1: expected 0 .off. or more MiB"):
        serve.main(args)
