"""deploy_endpoint.py: the trainML job it builds, and its calls to a stand-in SDK. No network, no trainml package."""

import ast
import asyncio
import inspect
import json
import subprocess
import sys
import types

import pytest

import deploy_endpoint
import inference


def test_job_spec_routes_post_instruct_to_inference_instruct(tmp_path):
    spec = deploy_endpoint.endpoint_job_spec("alpaca", tmp_path, gpu_count=2)
    assert (spec["type"], spec["gpu_types"], spec["gpu_count"]) == ("endpoint", ["rtx3090"], 2)
    assert spec["model"] == {"source_type": "local", "source_uri": str(tmp_path), "checkpoints": [{"id": "alpaca"}]}
    (route,) = spec["endpoint"]["routes"]
    assert (route["path"], route["verb"], route["file"], route["function"]) == (
        "/instruct",
        "POST",
        "inference",
        "instruct",
    )
    body = {f["name"]: f for f in route["body"]}
    assert list(body) == ["instruction", "input", "max_tokens", "temperature", "top_p", "num_beams"]  # the fork's
    assert [n for n, f in body.items() if not f.get("optional")] == ["instruction"]
    json.dumps(spec)  # the SDK posts it as JSON


def test_route_fields_match_the_instruct_signature():
    """Every field the route sends is a parameter of inference.instruct, and its required ones are required there."""
    params = inspect.signature(inference.instruct).parameters
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    assert [n for n, _, optional in deploy_endpoint.ROUTE_BODY if not optional] == required
    types_ = {"str": str, "int": int, "float": float}
    for name, kind, _ in deploy_endpoint.ROUTE_BODY:
        assert name in params and kind in types_


def test_bad_arguments_are_reported_together(tmp_path):
    with pytest.raises(ValueError) as e:
        deploy_endpoint.endpoint_job_spec(" ", tmp_path, gpu_count=5, disk_size=0)
    assert all(k in str(e.value) for k in ("--checkpoint", "--gpu-count must be 1 to 4, got 5", "--disk-size"))


def test_staged_files_are_all_the_endpoint_imports_from_this_repo(tmp_path):
    deploy_endpoint.stage_endpoint_files(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == set(deploy_endpoint.ENDPOINT_FILES)
    # a fresh interpreter in the staged folder imports inference and all it needs from there, not from this checkout
    probe = (
        "import sys, inference\n"
        "print(sorted(m.__file__ for m in list(sys.modules.values())\n"
        "             if m.__name__ == 'inference' or m.__name__.startswith('alpaca_trainml')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    files = ast.literal_eval(out.strip())
    assert files and all(f.startswith(str(tmp_path)) for f in files), files


def test_dry_run_prints_the_spec(capsys):
    deploy_endpoint.main(deploy_endpoint.parse_args(["--checkpoint", "alpaca", "--gpu-count", "1", "--dry-run"]))
    printed = json.loads(capsys.readouterr().out)
    assert printed["endpoint"]["routes"][0]["path"] == "/instruct" and printed["gpu_count"] == 1


def test_deploy_creates_uploads_waits_and_returns_the_url(monkeypatch, tmp_path):
    calls = []

    class FakeJob:
        id, url = "job-1", "https://abc.endpoints.example/"

        async def wait_for(self, status, timeout=300):
            calls.append(("wait_for", status))

        async def connect(self):
            calls.append(("connect",))

        async def refresh(self):
            calls.append(("refresh",))

    class FakeJobs:
        async def create(self, **kw):
            calls.append(("create", kw["name"], kw["endpoint"]["routes"][0]["path"]))
            return FakeJob()

    class FakeTrainML:
        jobs = FakeJobs()

    sdk = types.ModuleType("trainml.trainml")
    sdk.TrainML = FakeTrainML
    monkeypatch.setitem(sys.modules, "trainml", types.ModuleType("trainml"))
    monkeypatch.setitem(sys.modules, "trainml.trainml", sdk)
    spec = deploy_endpoint.endpoint_job_spec("alpaca", tmp_path)
    assert asyncio.run(deploy_endpoint.deploy(spec, timeout_s=60)) == FakeJob.url
    assert calls == [
        ("create", deploy_endpoint.JOB_NAME, "/instruct"),
        ("wait_for", "waiting for data/model download"),
        ("connect",),
        ("wait_for", "running"),
        ("refresh",),
    ]
