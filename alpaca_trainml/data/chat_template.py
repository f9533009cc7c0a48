"""The Alpaca chat template: a Jinja template that turns a chat into the Alpaca prompt, so that servers which
apply a checkpoint's chat template (serve.py, vLLM, TGI, llama.cpp, `transformers serve`) prompt a fine-tuned model
in the format it was trained on, instead of the base model's (SmolLM2's ChatML, say). prompts.Alpaca installs it.

    # print it, for `vllm serve CHECKPOINT --chat-template alpaca.jinja`; save it into a checkpoint's tokenizer files
    python -m alpaca_trainml.data.chat_template print > alpaca.jinja
    python -m alpaca_trainml.data.chat_template install out/demo

How a chat is placed, the one statement of it (the Alpaca prompt has no system slot and one turn): the last message
must be the user's and becomes the Instruction; system and developer messages, then the earlier turns as
"User: ..." and "Assistant: ..." lines, become the Input (system text first, a blank line, then the turns); each
message's text is trimmed; the prompt ends at "### Response:". Roles other than system, developer, user and
assistant are refused (serve.py answers 400 naming the role). The fixed text comes from templates.PROMPT_DICT.
"""

import json
import logging

from alpaca_trainml.cli import UsageError, run_fire
from alpaca_trainml.data.templates import PROMPT_DICT, STYLE_KEY, format_prompt

logger = logging.getLogger(__name__)


def _literal(text):
    """A Jinja string literal: JSON's escapes (\\n, \\", \\uXXXX) are also Jinja's."""
    return json.dumps(text)


def _pieces(template):
    """The fixed text of an Alpaca template around its {instruction} and {input} fields, in order."""
    head, rest = template.split("{instruction}")
    middle, tail = rest.split("{input}") if "{input}" in rest else (rest, None)
    return head, middle, tail


def build_template(prefix=""):
    """The Jinja chat template. prefix: a Jinja expression put first, such as "bos_token", for tokenizers that add a
    BOS when encoding text (servers encode a rendered chat without adding special tokens)."""
    head_in, mid_in, tail_in = _pieces(PROMPT_DICT["prompt_input"])
    head_no, tail_no, _ = _pieces(PROMPT_DICT["prompt_no_input"])
    fail = "{{ raise_exception(%s) }}"
    return "".join(
        [
            "{%- if not messages or messages[-1].role != 'user' -%}",
            fail % _literal("the last message must come from the user (it becomes the instruction)"),
            "{%- endif -%}",
            "{%- set ns = namespace(system=[], turns=[], instruction='') -%}",
            "{%- for m in messages -%}",
            "{%- set parts = namespace(text='') -%}",
            "{%- if m.content is string -%}{%- set parts.text = m.content -%}",
            "{%- elif m.content -%}{%- for p in m.content -%}",
            "{%- if p.type != 'text' -%}",
            fail % _literal("only text content parts are supported"),
            "{%- endif -%}",
            "{%- set parts.text = parts.text + (p.text or '') -%}",
            "{%- endfor -%}{%- endif -%}",
            "{%- set text = parts.text | trim -%}",
            "{%- if loop.last -%}{%- set ns.instruction = text -%}",
            "{%- elif m.role not in ['system', 'developer', 'user', 'assistant'] -%}",
            fail % _literal("roles must be system, developer, user or assistant"),
            "{%- elif not text -%}",
            "{%- elif m.role in ['system', 'developer'] -%}{%- set ns.system = ns.system + [text] -%}",
            "{%- else -%}{%- set ns.turns = ns.turns + [('User: ' if m.role == 'user' else 'Assistant: ') + text] -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if not ns.instruction -%}",
            fail % _literal("the last message is empty: the instruction must not be empty"),
            "{%- endif -%}",
            "{%- set context = (ns.system + ([ns.turns | join('\\n')] if ns.turns else [])) | join('\\n\\n') -%}",
            "{{- " + prefix + " -}}" if prefix else "",
            "{%- if context -%}",
            "{{- "
            + _literal(head_in)
            + " + ns.instruction + "
            + _literal(mid_in)
            + " + context + "
            + _literal(tail_in),
            " -}}",
            "{%- else -%}",
            "{{- " + _literal(head_no) + " + ns.instruction + " + _literal(tail_no) + " -}}",
            "{%- endif -%}",
        ]
    )


ALPACA_CHAT_TEMPLATE = build_template()
BOS_PREFIXES = ("", "bos_token", "bos_token + ' '")  # the variants install_chat_template chooses among


def has_alpaca_template(tokenizer):
    """Whether the tokenizer's chat template is one install_chat_template writes."""
    return tokenizer.chat_template in {build_template(prefix) for prefix in BOS_PREFIXES}


def install_chat_template(tokenizer):
    """Set tokenizer.chat_template to the Alpaca template (save_pretrained then writes it with the checkpoint).

    A rendered chat is encoded without special tokens, so for a tokenizer that adds a BOS to text the template
    writes it. Sentencepiece tokenizers differ on the space after it, so the variant whose ids match how
    train.py encodes a prompt is kept."""
    chat = [{"role": "user", "content": "Name a colour."}]
    trained = tokenizer(format_prompt("Name a colour."))["input_ids"]
    bos = tokenizer.bos_token_id
    prefixes = ["bos_token", "bos_token + ' '"] if bos is not None and trained[:1] == [bos] else [""]
    for prefix in prefixes:
        tokenizer.chat_template = build_template(prefix)
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if tokenizer(rendered, add_special_tokens=False)["input_ids"] == trained:
            return tokenizer
    tokenizer.chat_template = build_template(prefixes[0])
    logger.warning("the chat template's tokens differ from the training prompt's at the start (BOS and a space)")
    return tokenizer


def install(checkpoint):
    """Put the Alpaca template into a saved checkpoint's tokenizer files."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        raise UsageError(f"install {checkpoint}: cannot load its tokenizer ({e})") from e
    install_chat_template(tokenizer).init_kwargs[STYLE_KEY] = "alpaca"  # prompts.Alpaca's name
    tokenizer.save_pretrained(checkpoint)
    print(f"{checkpoint}: the Alpaca chat template is installed")


def show():
    """Print the Alpaca chat template."""
    print(ALPACA_CHAT_TEMPLATE)


if __name__ == "__main__":
    run_fire({"print": show, "install": install}, "chat_template.py")
