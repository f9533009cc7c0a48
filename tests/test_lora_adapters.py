"""lora_adapters.py and serve.py --lora_modules: the flag's two forms, the check that an adapter fits the base, and
the HTTP side: `model` picks an adapter (greedy text equal to the adapter's checkpoint served alone), /v1/models
lists them with their parent, an unknown model is a 404, and the runtime load and unload routes (off by default)."""

import json

import pytest
from helpers import build_lora_adapters, call_app
from prometheus_client.parser import text_string_to_metric_families

from alpaca_trainml.cli import UsageError
from alpaca_trainml.generation.llama_step import FAST_ENV
from alpaca_trainml.generation.lora_adapters import AdapterSet, parse_module
from inference import InstructModel
from serve import create_app, main, parse_args

BODY = dict(prompt="Once upon a time", max_tokens=8, temperature=0)


def test_lora_modules_take_name_equals_path_and_vllms_json_form():
    assert parse_module("sql=/a/b=c") == dict(name="sql", path="/a/b=c", base_model_name=None)
    spec = json.dumps({"name": "sql", "path": "/a", "base_model_name": "llama"})
    assert parse_module(spec) == dict(name="sql", path="/a", base_model_name="llama")
    assert parse_args(["--lora_modules", "a=/x", spec]).lora_modules == ["a=/x", spec]
    for bad, says in [("sql", "NAME=PATH"), ("=/a", "NAME=PATH"), ('{"name": "x"}', "name, path"), ("{x", "JSON")]:
        with pytest.raises(UsageError, match=says):
            parse_module(bad)
    with pytest.raises(UsageError, match=r"unknown keys \['rank'\]"):
        parse_module('{"name": "x", "path": "/a", "rank": 8}')


def test_an_adapter_that_does_not_fit_the_base_is_one_error_naming_its_tensors(lora_dirs, tmp_path, spm_tokenizer_dir):
    _, other = build_lora_adapters(spm_tokenizer_dir, tmp_path, names=["all"], intermediate_size=48)
    model = InstructModel(str(lora_dirs[0]))
    adapters = AdapterSet(model.model, "base")
    with pytest.raises(UsageError) as e:
        adapters.add("wide", other["all"])
    msg = str(e.value)
    assert "'wide'" in msg and "does not fit the base" in msg
    assert "model.layers.0.mlp.down_proj.weight: B @ A is [32, 48], the base tensor is [32, 64]" in msg
    with pytest.raises(UsageError, match="not an adapter folder"):
        adapters.add("nothing", tmp_path)
    adapters.add("qv", lora_dirs[1]["qv"])
    with pytest.raises(UsageError, match="taken"):
        adapters.add("qv", lora_dirs[1]["qv"])
    assert adapters.names() == ["qv"]


def test_serve_refuses_a_folder_that_is_not_an_adapter_before_the_model_loads(lora_dirs, tmp_path):
    args = parse_args(["--model_name_or_path", str(lora_dirs[0]), "--lora_modules", f"x={tmp_path}"])
    with pytest.raises(UsageError, match=f"--lora_modules 'x={tmp_path}': {tmp_path} is not a LoRA adapter folder"):
        main(args)


def test_the_generic_step_cannot_serve_adapters(lora_dirs, monkeypatch):
    model = InstructModel(str(lora_dirs[0]))
    monkeypatch.setenv(FAST_ENV, "0")
    with pytest.raises(UsageError, match="Llama-family model on our decode step"):
        AdapterSet(model.model, "base")


@pytest.fixture(scope="module")
def alone(lora_dirs):
    """BODY's greedy text from the base and each adapter folder served alone."""
    base, folders = lora_dirs
    texts = {}
    for name, folder in {"base": base, **folders}.items():
        (r,) = call_app(create_app(InstructModel(str(folder))), ("POST", "/v1/completions", dict(json=BODY)))
        texts[name] = r.json()["choices"][0]["text"]
    return texts


def test_model_picks_the_adapter_and_each_answers_as_its_checkpoint_alone(lora_dirs, alone):
    base, folders = lora_dirs
    modules = [f"{n}={p}" for n, p in folders.items()]
    app = create_app(InstructModel(str(base)), served_model_name="base", lora_modules=map(parse_module, modules))
    names = ["qv", "base", "all", "mlp", None, "qv", "all", "mlp"]  # 8 at once: one batch
    chat = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, model="mlp")
    answers = call_app(
        app,
        ("GET", "/v1/models", {}),
        ("POST", "/v1/completions", dict(json=dict(BODY, model="gpt-4"))),
        ("POST", "/v1/chat/completions", dict(json=chat)),
        *[("POST", "/v1/completions", dict(json=dict(BODY, model=n) if n else BODY)) for n in names],
    )
    (scrape,) = call_app(app, ("GET", "/metrics", {}), generate=False)
    counted = {
        s.labels["lora_name"]: s.value
        for family in text_string_to_metric_families(scrape.text)
        for s in family.samples
        if s.name == "alpaca:lora_requests_total"
    }
    assert counted == {"qv": 2, "all": 2, "mlp": 3}  # names' adapters, and the chat on mlp
    cards = answers[0].json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("qv", "base"), ("all", "base"), ("mlp", "base")]
    assert cards[1]["root"] == str(folders["qv"])
    missing = answers[1]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "'base', 'qv', 'all', 'mlp'" in missing.json()["error"]["message"]
    assert answers[2].status_code == 200 and answers[2].json()["model"] == "mlp"
    for name, r in zip(names, answers[3:]):
        assert r.status_code == 200, r.text
        assert r.json()["model"] == (name or "base")
        assert r.json()["choices"][0]["text"] == alone[name or "base"], name
    assert len(set(alone.values())) == 4  # each adapter answers apart from the base and the others


def test_runtime_loading_is_off_unless_allowed_and_then_loads_and_unloads(lora_dirs, alone, tmp_path):
    base, folders = lora_dirs
    off = create_app(InstructModel(str(base)))
    (r,) = call_app(off, ("POST", "/v1/load_lora_adapter", dict(json={"lora_name": "x", "lora_path": "/"})))
    assert r.status_code in (404, 405)  # no such route: the web UI's files answer
    assert "/v1/load_lora_adapter" not in off.openapi()["paths"]
    app = create_app(InstructModel(str(base)), served_model_name="base", allow_runtime_lora_updating=True)
    load = ("POST", "/v1/load_lora_adapter", dict(json={"lora_name": "all", "lora_path": str(folders["all"])}))
    first = call_app(app, load, generate=False)[0]
    assert first.status_code == 200 and first.text == "Success: LoRA adapter 'all' added successfully."
    model_field = app.openapi()["components"]["schemas"]["CompletionBody"]["properties"]["model"]
    assert model_field["anyOf"][0]["enum"] == ["base", "all"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # no r, no lora_alpha
    again, bad, broken, use = call_app(
        app,
        load,
        ("POST", "/v1/load_lora_adapter", dict(json={"lora_name": "x", "lora_path": str(tmp_path)})),
        ("POST", "/v1/load_lora_adapter", dict(json={"lora_name": "y", "lora_path": str(tmp_path / "broken")})),
        ("POST", "/v1/completions", dict(json=dict(BODY, model="all"))),
    )
    assert again.status_code == 400 and again.json()["error"]["code"] == "lora_adapter_exists"
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_lora_adapter"
    assert broken.status_code == 400 and "KeyError" in broken.json()["error"]["message"]
    assert use.json()["choices"][0]["text"] == alone["all"]
    unload = ("POST", "/v1/unload_lora_adapter", dict(json={"lora_name": "all"}))
    gone, twice, after = call_app(app, unload, unload, ("POST", "/v1/completions", dict(json=dict(BODY, model="all"))))
    assert sorted([gone.status_code, twice.status_code]) == [200, 404]
    assert after.status_code == 404
    doc = app.openapi()
    assert doc["components"]["schemas"]["CompletionBody"]["properties"]["model"]["anyOf"][0]["enum"] == ["base"]
    declared = doc["paths"]["/v1/unload_lora_adapter"]["post"]["responses"]
    assert set(declared) == {"200", "400", "401", "403", "404", "413"}  # routes/lora.py's ERRORS, as the others
