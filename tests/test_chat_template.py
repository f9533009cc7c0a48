"""chat_template.py: the Jinja chat template places every chat as its docstring says (helpers.alpaca_chat_prompt
states the rule plainly, then utils.format_prompt), through transformers' own apply_chat_template, and it is saved
with a checkpoint."""

import random

import pytest
from helpers import alpaca_chat_prompt
from transformers import AutoTokenizer

from alpaca_trainml.data.chat_template import ALPACA_CHAT_TEMPLATE, install_chat_template
from utils import format_prompt

TEXTS = ["Hi", "  Name a colour.  ", "", "   ", "Line one.\nLine two.", 'Quotes " and \\ backslash', "Ünïcödé ✓"]


def random_chat(rng):
    """A chat of 1-6 messages; usually valid (last one the user's), sometimes not, in the ways users get it wrong."""
    roles = ["system", "developer", "user", "assistant"]
    chat = [{"role": rng.choice(roles), "content": content(rng)} for _ in range(rng.randint(0, 5))]
    last = rng.choices(["user", "assistant", "tool"], weights=[8, 1, 1])[0]
    chat.append({"role": last, "content": content(rng)})
    if rng.random() < 0.05:
        chat[0]["role"] = "tool"
    return chat


def content(rng):
    kind = rng.random()
    if kind < 0.6:
        return rng.choice(TEXTS)
    if kind < 0.9:  # OpenAI content parts
        return [{"type": "text", "text": rng.choice(TEXTS)} for _ in range(rng.randint(1, 3))]
    return None


def serve_prompt(chat):
    """The Alpaca prompt for a chat, or None where the template refuses it (serve.py answers 400)."""
    try:
        return format_prompt(*alpaca_chat_prompt(chat))
    except ValueError:
        return None


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer_dir):
    return install_chat_template(AutoTokenizer.from_pretrained(bpe_tokenizer_dir))


def test_the_template_renders_every_chat_as_serve_maps_it(bpe):
    assert bpe.chat_template == ALPACA_CHAT_TEMPLATE  # a GPT-2 style tokenizer adds no BOS
    rng, valid, refused = random.Random(0), 0, 0
    for _ in range(600):
        chat = random_chat(rng)
        expected = serve_prompt(chat)
        if expected is None:
            with pytest.raises(Exception, match="message|role|content|supported"):
                bpe.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            refused += 1
            continue
        assert bpe.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected, chat
        valid += 1
    assert valid > 300 and refused > 50  # both kinds were really tried (counts from seed 0's mix)


@pytest.mark.parametrize("add_bos", [False, True])
def test_the_rendered_chat_encodes_to_the_ids_it_was_trained_on(spm_tokenizer_dir, add_bos):
    """vLLM and transformers encode a rendered chat without special tokens: the template must write the BOS where
    the tokenizer adds one, and the sentencepiece space after it, or the model sees ids it was not trained on."""
    tok = install_chat_template(AutoTokenizer.from_pretrained(spm_tokenizer_dir, add_bos_token=add_bos))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count the words."}]
    ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    trained = tok(format_prompt("Count the words.", "Be brief."))["input_ids"]  # how train.py tokenizes a prompt
    assert (trained[0] == tok.bos_token_id) == add_bos
    assert ids == trained


def test_the_template_is_saved_with_the_checkpoint(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == ALPACA_CHAT_TEMPLATE


def test_a_chat_is_placed_in_the_alpaca_prompt(bpe):
    def render(chat):
        return bpe.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    assert render([{"role": "user", "content": " Name a colour. "}]) == format_prompt("Name a colour.")
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "developer", "content": "  "},  # empty: left out
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]
    assert render(chat) == format_prompt("Name a colour.", "Be brief.\n\nUser: Hi\nAssistant: Hello!")
