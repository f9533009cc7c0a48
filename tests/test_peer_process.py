"""benchmarks/peer_process.py: a peer that crashes, hangs or fails to load costs one row, with the reason; fake
peers (a few lines of Python run in a subprocess) stand in for llama.cpp and TRL."""

import sys
import time

import httpx
import pytest

from benchmarks.peer_process import PeerFailed, http_server, run_logged, run_peer

SEGFAULT = "import os, signal, sys; print('loading model.gguf', file=sys.stderr); os.kill(os.getpid(), signal.SIGSEGV)"
HANG = "import sys, time; print('warming up', file=sys.stderr, flush=True); time.sleep(60)"
CANNOT_LOAD = "import sys; sys.exit('error: cannot load model.gguf: unknown type')"


def fake(code):
    return [sys.executable, "-c", code]


def test_a_peer_killed_by_a_signal_is_reported_by_name_with_its_last_stderr_line():
    with pytest.raises(PeerFailed) as e:
        run_peer("llama.cpp q8_0", fake(SEGFAULT), timeout=30)
    assert str(e.value) == "llama.cpp q8_0: killed by SIGSEGV; last stderr line: loading model.gguf"


def test_a_peer_that_hangs_is_stopped_at_its_time_limit():
    start = time.monotonic()
    with pytest.raises(PeerFailed, match=r"^vLLM: timed out after 1 s; last stderr line: warming up$"):
        run_peer("vLLM", fake(HANG), timeout=1)
    assert time.monotonic() - start < 30  # 60 s if it had waited for the sleep


def test_a_peer_that_cannot_load_gives_its_exit_code_and_error():
    with pytest.raises(PeerFailed, match=r"exit code 1; last stderr line: error: cannot load model.gguf"):
        run_peer("llama.cpp", fake(CANNOT_LOAD), timeout=30)
    with pytest.raises(PeerFailed, match="could not start"):
        run_peer("llama.cpp", ["/nonexistent/python"], timeout=30)


def test_a_peer_that_works_returns_its_output():
    out = run_peer("peer", fake("print(input())"), timeout=30, input="hello\n")
    assert out.stdout == "hello\n"


def test_logged_runs_report_a_crash_a_hang_and_a_success(tmp_path):
    with pytest.raises(PeerFailed, match=r"^TRL: killed by SIGSEGV; last stderr line: loading model.gguf"):
        run_logged("TRL", fake(SEGFAULT), tmp_path / "crash.txt", timeout=30)
    with pytest.raises(PeerFailed, match=r"^TRL: timed out after 1 s; last line of .*hang.txt: warming up$"):
        run_logged("TRL", fake(HANG), tmp_path / "hang.txt", timeout=1)
    seconds, rss = run_logged("TRL", fake("print('trained')"), tmp_path / "ok.txt", timeout=30)
    assert (tmp_path / "ok.txt").read_text() == "trained\n"
    assert seconds > 0 and rss > 0.001  # a Python process holds more than 1 MiB


@pytest.fixture
def crashing_python(tmp_path):
    """An interpreter that dies of SIGSEGV as it starts, as llama.cpp's q8_0 did on an AMX machine."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\necho 'ggml: loading model' >&2\nkill -SEGV $$\n")
    path.chmod(0o755)
    return path


def test_decode_speed_turns_a_crashed_llama_cpp_or_vllm_into_a_failed_row(crashing_python, monkeypatch):
    from benchmarks import decode_speed

    monkeypatch.setattr(decode_speed, "PEERS_PYTHON", crashing_python)
    monkeypatch.setattr(decode_speed, "VLLM_PYTHON", crashing_python)
    with pytest.raises(PeerFailed, match=r"^llama.cpp \(m-q8_0.gguf\): killed by SIGSEGV; .*: ggml: loading model$"):
        decode_speed.llama_cpp_rate("m-q8_0.gguf", [1, 2, 3], 8, 1)
    with pytest.raises(PeerFailed, match=r"^vLLM float32: killed by SIGSEGV"):
        decode_speed.vllm_run("m", "float32", [1, 2, 3], 8, [], 4)
    table = decode_speed.Table()
    table.fail("llama.cpp (m-q8_0.gguf)", PeerFailed("llama.cpp: killed by SIGSEGV"))
    assert table.failed == [("llama.cpp (m-q8_0.gguf)", "llama.cpp: killed by SIGSEGV")] and not list(table)


def test_peers_training_keeps_going_past_a_crashed_trl_run(crashing_python, tmp_path):
    from benchmarks import peers_training

    args = peers_training.parse_args(["--peers_python", str(crashing_python), "--timeout", "30"])
    result = peers_training.run_side(args, tmp_path, "trl-padded", "lora", "fp32")
    assert result["side"] == "trl-padded"
    assert result["failed"].startswith("trl-padded lora-fp32: killed by SIGSEGV; last stderr line: ggml: loading")
    assert peers_training.summarize([dict(side="ours", tokens_per_s=1.0), result], {"padded"}) == "n/a (TRL failed)"


MODELS_SERVER = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": "tiny"}]}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_a_server_peer_is_waited_for_then_stopped_and_one_that_dies_or_hangs_is_a_failed_row(tmp_path):
    from benchmarks.serve_throughput import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with http_server("fake vLLM", [*fake(MODELS_SERVER), str(port)], url, tmp_path / "ok.log", timeout=60) as name:
        assert name == "tiny" and httpx.get(url + "/v1/models").status_code == 200
    with pytest.raises(httpx.ConnectError):  # stopped on leaving
        httpx.get(url + "/v1/models", timeout=5)
    with pytest.raises(PeerFailed, match=r"^vLLM: killed by SIGSEGV; last stderr line: loading model.gguf"):
        with http_server("vLLM", fake(SEGFAULT), url, tmp_path / "crash.log", timeout=60):
            pass
    start = time.monotonic()
    with pytest.raises(PeerFailed, match=r"^vLLM: not answering after 1 s; last line of .*hang.log: warming up$"):
        with http_server("vLLM", fake(HANG), url, tmp_path / "hang.log", timeout=1):
            pass
    assert time.monotonic() - start < 30


def test_decode_speeds_speculative_rows_go_on_past_a_crashed_llama_cpp(
    crashing_python, monkeypatch, capsys, tiny_llama_dir, tmp_path
):
    """decode_speed's speculative rows (benchmarks/speculative.py): ours plain and ngram on the first grounded
    prompt, then llama.cpp plain and with its lookup, both of which crash here: two FAILED lines, our part stays."""
    from alpaca_trainml.generation.model import InstructModel
    from benchmarks import decode_speed, speculative

    monkeypatch.setattr(decode_speed, "PEERS_PYTHON", crashing_python)
    monkeypatch.setattr(speculative, "peer_status", lambda: None)  # as if .venv-peers were installed
    monkeypatch.setattr(speculative, "gguf_file", lambda checkpoint, outtype, folder: tmp_path / "m-f32.gguf")
    model = InstructModel(str(tiny_llama_dir))
    head = speculative.decode_speed_rows(model, str(tiny_llama_dir), 8, 1, tmp_path)
    out = capsys.readouterr().out
    assert head.startswith("speculative alpaca_input ") and "identical 1/1" in head and "llama.cpp" not in head
    assert out.count("FAILED: llama.cpp (m-f32.gguf): killed by SIGSEGV") == 2, out  # plain and lookup
