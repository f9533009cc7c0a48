"""models.py: model names and folders resolved before transformers sees them, a missing folder or unknown hub id as
one UsageError, and the converted embedded model's config. No model is loaded here."""

import json

import pytest

from alpaca_trainml import models
from alpaca_trainml.cli import UsageError


def test_resolve_model_path_keeps_folders_and_hub_ids_and_names_what_is_missing(tmp_path):
    assert models.resolve_model_path(tmp_path) == str(tmp_path)
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id
    for name in (
        tmp_path / "nope",
        "./out/model",
        "a/b/c",
    ):  # can only be a path: "owner/name" is the most a hub id has
        with pytest.raises(UsageError, match=f"{name}: no such folder"):
            models.resolve_model_path(str(name))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="is a file; give the model folder"):
        models.resolve_model_path(tmp_path / "model.safetensors")


def test_from_pretrained_names_the_model_in_one_line_when_the_loader_cannot_find_it(tmp_path):
    class Loader:
        @staticmethod
        def from_pretrained(path, **kwargs):
            raise OSError("Can't load the configuration of 'x'.\nMore lines of advice follow.")

    with pytest.raises(UsageError) as e:
        models.from_pretrained(Loader, str(tmp_path))
    assert str(e.value) == f"{tmp_path}: no such folder here, and not a model the hub could serve (Can't load the " + (
        "configuration of 'x'.)"
    )  # the first line of transformers' message only


def test_drop_quantization_config_keeps_the_rest_of_the_config(tmp_path):
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gguf"}, "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    models.drop_quantization_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama", "hidden_size": 64}


def test_a_converted_embedded_model_is_reused_without_converting_again(tmp_path, monkeypatch):
    (tmp_path / "CONVERTED_FROM").write_text("x.gguf\n")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {}, "model_type": "llama"}))

    def refuse(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf_to_hf", refuse)
    assert models.embedded_model_path(cache_dir=tmp_path) == str(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}  # the old cache is fixed


def test_a_local_looking_name_that_is_no_folder_fails_at_once_with_the_closest_sibling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "demo-lora").mkdir(parents=True)
    (tmp_path / "out" / "demo").mkdir()
    # out/ exists here, so out/demo-lroa is a path, not the hub id "out/demo-lroa": no hub request, no wait
    with pytest.raises(UsageError) as e:
        models.resolve_model_path("out/demo-lroa")
    assert str(e.value) == "out/demo-lroa: no such folder (did you mean out/demo-lora?)"
    with pytest.raises(UsageError, match=r"^\./outt/demo: no such folder; outt does not exist either$"):
        models.resolve_model_path("./outt/demo")
    assert models.resolve_model_path("someone/model") == "someone/model"  # no folder someone/ here: a hub id


def test_check_checkpoint_names_what_a_folder_lacks(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError) as e:  # what model.save_pretrained alone writes
        models.check_checkpoint(model)
    assert str(e.value) == (
        f"{model}: not a complete checkpoint: no tokenizer (tokenizer.json or tokenizer.model or vocab.json or "
        "vocab.txt); save it next to the model with tokenizer.save_pretrained(folder)"
    )
    (model / "tokenizer.json").write_text("{}")
    models.check_checkpoint(model)  # complete: passes
    (tmp_path / "run" / "checkpoint-500").mkdir(parents=True)
    for step in ("checkpoint-500", "checkpoint-1000"):
        (tmp_path / "run" / step).mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (tmp_path / "run" / step / name).write_text("")
    with pytest.raises(UsageError, match=r"no config \(config.json\), no weights .*checkpoint-1000 is complete$"):
        models.check_checkpoint(tmp_path / "run")  # the highest step, not the last in name order
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"no adapter weights \(adapter_model.safetensors or adapter_model.bin\)"):
        models.check_checkpoint(adapter)
    models.check_checkpoint(models.EMBEDDED_MODEL)  # the embedded model and hub ids are the loader's to check
    models.check_checkpoint("someone/model")
