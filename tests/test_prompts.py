"""prompts.py: the registry of prompt styles, the style saved with a checkpoint and read back by InstructModel, and
the Alpaca chat template generated from the registry."""

import json

import pytest
import torch
from helpers import load_tokenizer, tiny_llama_config
from transformers import AutoTokenizer, LlamaForCausalLM

from alpaca_trainml.data import chat_template, prompts
from alpaca_trainml.data.prompts import PROMPT_DICT, format_prompt
from alpaca_trainml.generation.model import InstructModel

TEMPLATE = "{% for m in messages %}{{ m.role + ': ' + m.content + eos_token }}{% endfor %}"
TEMPLATE += "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"


@pytest.fixture
def bpe(bpe_tokenizer_dir):
    return load_tokenizer(bpe_tokenizer_dir, max_length=512)


def test_the_registry_names_its_styles_and_refuses_others():
    assert prompts.get_style("alpaca") is prompts.ALPACA and set(prompts.PROMPT_STYLES) == {"alpaca", "model"}
    with pytest.raises(ValueError, match="unknown prompt style 'chatml'; choose one of alpaca, model"):
        prompts.get_style("chatml")


def test_the_alpaca_style_is_the_original_prompt():
    assert prompts.ALPACA.instruction_prompt(None, "Sort.", "b a") == prompts.format_prompt("Sort.", "b a")
    assert prompts.ALPACA.templates is prompts.PROMPT_DICT and prompts.ALPACA.add_special_tokens


def test_auto_keeps_alpaca_rows_on_the_original_prompt_and_gives_chats_the_model_template(bpe):
    assert prompts.choose_style("auto", bpe, has_chat_rows=True).name == "alpaca"  # no template of its own
    bpe.chat_template = TEMPLATE
    assert prompts.choose_style("auto", bpe, has_chat_rows=False).name == "alpaca"  # label-identical Alpaca rows
    assert prompts.choose_style("auto", bpe, has_chat_rows=True).name == "model"
    assert prompts.choose_style("alpaca", bpe, has_chat_rows=True).name == "alpaca"
    prompts.ALPACA.install(bpe)  # a checkpoint of ours trained in the Alpaca style, fine-tuned again
    assert prompts.choose_style("auto", bpe, has_chat_rows=True).name == "alpaca"  # its template is the Alpaca one
    bpe.chat_template = TEMPLATE
    prompts.get_style("model").install(bpe)  # one trained on its own template keeps it, for Alpaca rows (DPO) too
    assert prompts.choose_style("auto", bpe, has_chat_rows=False).name == "model"
    prompts.save_style(bpe, prompts.ALPACA)
    bpe.chat_template = None
    with pytest.raises(ValueError, match="no chat template; use --prompt_style alpaca"):
        prompts.choose_style("model", bpe, has_chat_rows=True)


def test_the_chat_template_is_generated_from_the_registry(monkeypatch, bpe):
    changed = {k: v.replace("### Response:", "### Answer:") for k, v in prompts.PROMPT_DICT.items()}
    monkeypatch.setattr(chat_template, "PROMPT_DICT", changed)
    bpe.chat_template = chat_template.build_template()
    chat = [{"role": "user", "content": "Name a colour."}]
    rendered = bpe.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == changed["prompt_no_input"].format(instruction="Name a colour.")


@pytest.mark.parametrize("style", ["alpaca", "model"])
def test_the_style_is_saved_with_the_tokenizer_and_read_back(bpe, tmp_path, style):
    bpe.chat_template = TEMPLATE
    prompts.get_style(style).install(bpe)
    bpe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["prompt_style"] == style
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert prompts.load_style(loaded).name == style and prompts.load_style(None, tmp_path).name == style
    expected = chat_template.ALPACA_CHAT_TEMPLATE if style == "alpaca" else TEMPLATE
    assert loaded.chat_template == expected  # the template the data was rendered with


def test_a_checkpoint_from_before_the_registry_is_alpaca(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    assert prompts.load_style(AutoTokenizer.from_pretrained(tmp_path), tmp_path).name == "alpaca"


@pytest.mark.parametrize("style", ["alpaca", "model"])
def test_instruct_model_prompts_in_the_checkpoints_style(bpe, style):
    bpe.chat_template = TEMPLATE
    prompts.get_style(style).install(bpe)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(bpe), eos_token_id=bpe.eos_token_id))
    ids = InstructModel(model=model, tokenizer=bpe).encode_instruction("Sort the words.", "b a")
    if style == "model":
        chat = [{"role": "user", "content": "Sort the words.\n\nb a"}]
        text = bpe.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text == f"user: Sort the words.\n\nb a{bpe.eos_token}assistant:"
        assert ids == bpe(text, add_special_tokens=False)["input_ids"]
    else:
        assert ids == bpe(prompts.format_prompt("Sort the words.", "b a"))["input_ids"]


def test_the_templates_end_at_the_response_header_without_a_newline():
    for template in PROMPT_DICT.values():
        assert template.endswith("### Response:")  # the model's answer follows directly, as Alpaca trained
    assert "{input}" in PROMPT_DICT["prompt_input"] and "{input}" not in PROMPT_DICT["prompt_no_input"]


def test_format_prompt_picks_the_template_by_the_input():
    with_input = format_prompt("Sort these.", "b a")
    assert with_input.endswith("### Instruction:\nSort these.\n\n### Input:\nb a\n\n### Response:")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    for empty in (None, ""):  # no input, or an empty one: the no-input template
        assert format_prompt("Name a colour.", empty) == PROMPT_DICT["prompt_no_input"].format(
            instruction="Name a colour."
        )


def test_braces_in_the_text_are_kept_as_written():
    assert "{x} and {input}" in format_prompt("Explain {x} and {input}.")  # format_map fills the template only
