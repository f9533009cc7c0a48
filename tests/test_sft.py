"""training/sft.py on chat data and with NEFTune, end to end on a 2-layer Llama: the checkpoint keeps the prompt
style and the chat template it was trained with; padding-free equals padded; NEFTune noise in training steps only."""

import json

import pytest
import torch
from helpers import build_tiny_llama, load_all, make_rows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alpaca_trainml.data import prompts
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.training import sft

TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m.role + '\\n' + m.content + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant\\n' }}{% endif %}"
)


def chats(n, seed):
    """n made-up chats of one or two answers, from the helper's Alpaca rows."""
    rows = make_rows(2 * n, seed=seed)
    out = []
    for i in range(n):
        a, b = rows[2 * i], rows[2 * i + 1]
        turns = [("user", a["instruction"]), ("assistant", a["output"])]
        turns += [("user", b["instruction"]), ("assistant", b["output"])] if i % 2 else []
        out.append({"messages": [{"role": r, "content": t} for r, t in turns]})
    return out


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory, bpe_tokenizer_dir):
    """The tiny Llama over a tokenizer with a chat template of its own."""
    tok_dir = tmp_path_factory.mktemp("chat_tok")
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tok_dir)
    return build_tiny_llama(tok_dir, tmp_path_factory.mktemp("chat_llama"))


def common_args(model_dir, data, out, *extra):
    return [
        "--model_name_or_path",
        str(model_dir),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-3",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--model_max_length",
        "256",
        "--dataloader_num_workers",
        "0",
        "--seed",
        "3",
        *extra,
    ]


def test_chat_training_saves_its_template_and_style_and_padding_free_equals_padded(chat_llama_dir, tmp_path):
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats(12, seed=1)))
    (tmp_path / "rows.json").write_text(json.dumps(make_rows(4, seed=2)))  # a second shape in the same run
    data = f"{tmp_path / 'chats.jsonl'},{tmp_path / 'rows.json'}"

    def run(name, *extra):
        trainer = sft.train(common_args(chat_llama_dir, data, tmp_path / name, "--max_steps", "3", *extra))
        return [x["loss"] for x in trainer.state.log_history if "loss" in x]

    padded = run("padded", "--padding_free", "False")
    free = run("free", "--padding_free", "True")
    assert len(padded) == 3 and free == pytest.approx(padded, rel=1e-4)
    config = json.loads((tmp_path / "free" / "tokenizer_config.json").read_text())
    assert config["prompt_style"] == "model"  # auto: chat data and a model with a template of its own
    assert AutoTokenizer.from_pretrained(tmp_path / "free").chat_template == TEMPLATE
    model = InstructModel(str(tmp_path / "free"))
    assert model.prompt_style.name == "model"
    ids = model.encode_instruction("Count the words.")
    assert model.tokenizer.decode(ids) == f"### user\nCount the words.{model.tokenizer.eos_token}\n### assistant\n"


def test_prompt_style_alpaca_installs_the_alpaca_template_for_chat_data(chat_llama_dir, tmp_path, capsys):
    (tmp_path / "chats.json").write_text(json.dumps(chats(4, seed=3)))
    argv = common_args(chat_llama_dir, tmp_path / "chats.json", tmp_path / "out", "--max_steps", "1")
    sft.train(argv + ["--prompt_style", "alpaca", "--demo_generations", "1"])
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert prompts.load_style(tok).name == "alpaca" and "### Response:" in tok.chat_template
    first_user = chats(4, seed=3)[0]["messages"][0]["content"]
    assert f"### Instruction: {first_user}\n--- before:" in capsys.readouterr().out  # the demo asks a chat's question


def spy_on_embeddings(monkeypatch, records):
    """Wrap load_model_and_tokenizer: record, for every forward of the first decoder layer, whether the model was
    training and whether its input differed from the embedding table's clean output (a hook that runs before
    NEFTune's, which the Trainer adds later)."""
    real = sft.load_model_and_tokenizer

    def spying(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        clean = {}
        embeddings = model.get_input_embeddings()
        embeddings.register_forward_hook(lambda m, i, out: clean.update(x=out.detach().clone()))
        layer = next(m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer")

        def before_layer(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            records.append((model.training, not torch.equal(hidden.detach(), clean["x"])))

        layer.register_forward_pre_hook(before_layer, with_kwargs=True)
        records.append(("model", model))
        return model, tokenizer

    monkeypatch.setattr(sft, "load_model_and_tokenizer", spying)


@pytest.mark.parametrize("lora", [False, True])
def test_neftune_noise_is_added_in_training_steps_only(lora, tiny_llama_dir, tmp_path, monkeypatch):
    (tmp_path / "train.json").write_text(json.dumps(make_rows(8, seed=4)))
    (tmp_path / "eval.json").write_text(json.dumps(make_rows(2, seed=5)))
    records = []
    spy_on_embeddings(monkeypatch, records)
    extra = ["--eval_data_path", str(tmp_path / "eval.json"), "--eval_strategy", "steps", "--eval_steps", "1"]
    extra += ["--max_steps", "2", "--neftune_noise_alpha", "5", "--demo_generations", "1"]
    extra += ["--use_peft", "True", "--learning_rate", "2e-4"] if lora else []
    sft.train(common_args(tiny_llama_dir, tmp_path / "train.json", tmp_path / "out", *extra))
    (_, model), steps = records[0], records[1:]
    trained = [noisy for training, noisy in steps if training]
    evaluated = [noisy for training, noisy in steps if not training]
    assert len(trained) == 2 and all(trained)  # both training steps (4 rows a step) saw noisy embeddings
    assert len(evaluated) > 2 and not any(evaluated)  # evaluations and the demo's generation: clean
    embeddings = model.get_input_embeddings()
    assert not hasattr(embeddings, "neftune_noise_alpha") and len(embeddings._forward_hooks) == 1  # ours only
    saved = load_all(tmp_path / "out") if not lora else load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and not any("neftune" in k for k in saved)
    if not lora:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert not reloaded.get_input_embeddings()._forward_hooks
        assert torch.equal(reloaded.get_input_embeddings().weight, embeddings.weight.detach())
