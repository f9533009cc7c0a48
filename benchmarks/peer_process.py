"""Run a peer (llama.cpp, vLLM, TRL, alpaca_eval) in its own process, with a time limit, so that a peer which
segfaults, hangs or cannot load costs the benchmark one row and not the run.

A failure is a finding: PeerFailed says what happened in one line (the signal by name, the exit code or the time
limit, then the last line the peer wrote to stderr) and the benchmark prints it in the row's place and goes on.
Measured on 2026-12-05 (a 2-core Xeon with AVX512-BF16 and AMX): llama-cpp-python 0.3.36 dies on any q8_0 file
here, and before this a whole decode_speed run died with it.
"""

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


class PeerFailed(RuntimeError):
    """A peer's process crashed, timed out or exited with an error; str() is the one-line reason."""


def last_line(text):
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(nothing on stderr)"


def why(returncode, stderr):
    """One line: how the process ended and the last line of its stderr."""
    if returncode < 0:  # killed by a signal (subprocess's convention)
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"killed by {name}"
    else:
        how = f"exit code {returncode}"
    return f"{how}; last stderr line: {last_line(stderr)}"


def run_peer(what, cmd, timeout, input=None, **kwargs):
    """subprocess.run(cmd) capturing text output, within `timeout` seconds; the CompletedProcess when it exits 0,
    else PeerFailed('<what>: killed by SIGSEGV; last stderr line: ...'). kwargs go to subprocess.run (cwd, env)."""
    try:
        out = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it already
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise PeerFailed(f"{what}: timed out after {timeout:g} s; last stderr line: {last_line(stderr)}") from None
    except OSError as e:  # no such interpreter, not executable
        raise PeerFailed(f"{what}: could not start: {e}") from None
    if out.returncode != 0:
        raise PeerFailed(f"{what}: {why(out.returncode, out.stderr)}")
    return out


def run_logged(what, cmd, log_path, timeout, **kwargs):
    """Run cmd with stdout and stderr into log_path, within `timeout` seconds: (seconds, peak RSS in GiB of that
    process alone, from wait4's rusage), or PeerFailed with the log's last line. kwargs go to Popen (cwd, env)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)
        except OSError as e:
            raise PeerFailed(f"{what}: could not start: {e}") from None
        timer = threading.Timer(timeout, proc.kill)  # wait4 has no time limit: the timer kills a hung run
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    seconds = time.perf_counter() - start
    if code != 0:
        tail = Path(log_path).read_text(errors="replace")
        if code == -signal.SIGKILL and seconds >= timeout:
            raise PeerFailed(f"{what}: timed out after {timeout:g} s; last line of {log_path}: {last_line(tail)}")
        raise PeerFailed(f"{what}: {why(code, tail)} (all of it in {log_path})")
    return seconds, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


@contextmanager
def http_server(what, cmd, url, log_path, timeout, **kwargs):
    """Start a server process (cmd, its output into log_path) and wait until GET url/v1/models answers 200; yields
    the model name it serves first. One that exits or does not answer within `timeout` seconds is PeerFailed (the
    exit code or signal and its log's last line). On leaving, the process and its children (its own session) get
    SIGTERM, then SIGKILL after 30 s. kwargs go to Popen (cwd, env)."""
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        except OSError as e:
            raise PeerFailed(f"{what}: could not start: {e}") from None
    try:
        name, deadline = None, time.monotonic() + timeout
        while name is None:
            if proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")
                raise PeerFailed(f"{what}: {why(proc.returncode, tail)} (all of it in {log_path})")
            if time.monotonic() > deadline:
                tail = Path(log_path).read_text(errors="replace")
                raise PeerFailed(
                    f"{what}: not answering after {timeout:g} s; last line of {log_path}: {last_line(tail)}"
                )
            try:
                r = httpx.get(url + "/v1/models", timeout=5)
                name = r.json()["data"][0]["id"] if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                pass
            if name is None:
                time.sleep(1)
        yield name
    finally:
        stop_group(proc)


def stop_group(proc, grace=30):
    """SIGTERM to the process's session (a server's workers too); after the leader exits or `grace` seconds pass,
    SIGKILL to whatever of the session is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole session has gone
            break
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
