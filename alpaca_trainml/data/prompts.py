"""The prompt-style registry: how an instruction (and a chat) becomes the text a model is trained and prompted on.

Each style is defined once here. train.py picks one (--prompt_style), and saves its name with the checkpoint's
tokenizer (the "prompt_style" key of tokenizer_config.json, written by every save_pretrained); inference.py,
serve.py and evaluate.py read it back through generation/model.py. chat_template.py generates the Alpaca style's
Jinja chat template from the templates below.

    alpaca  the original's prompt (PROMPT_DICT), byte for byte; chats use the Alpaca chat template
    model   the tokenizer's own chat template (SmolLM2's ChatML, Llama 3's, ...); an instruction and its input
            become one user message
"""

import json
from pathlib import Path

# Byte for byte the templates Alpaca was trained with: "### Response:" has no trailing newline.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}

STYLE_KEY = "prompt_style"  # the tokenizer_config.json key that names a checkpoint's style
AUTO = "auto"  # --prompt_style's default: alpaca for Alpaca rows; for chat data the model's template if it has one


def format_prompt(instruction, input=None):
    """The Alpaca prompt for one example; an empty or missing input picks the no-input template."""
    if input:
        return PROMPT_DICT["prompt_input"].format_map({"instruction": instruction, "input": input})
    return PROMPT_DICT["prompt_no_input"].format_map({"instruction": instruction})


def instruction_messages(instruction, input=None):
    """An Alpaca instruction (and input) as a chat: one user message, the input after a blank line."""
    return [{"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}]


class PromptStyle:
    """A prompt style. apply() gives the prompt text; add_special_tokens says how that text is tokenized."""

    name = ""
    add_special_tokens = True

    def apply(self, instruction, input=None, tokenizer=None):
        raise NotImplementedError


class Alpaca(PromptStyle):
    """The original Alpaca prompt; the tokenizer adds its BOS as train.py's original preprocessing does."""

    name = "alpaca"
    templates = PROMPT_DICT

    def apply(self, instruction, input=None, tokenizer=None):
        return format_prompt(instruction, input)


class ModelChatTemplate(PromptStyle):
    """The tokenizer's own chat template, which writes any BOS itself."""

    name = "model"
    add_special_tokens = False

    def apply(self, instruction, input=None, tokenizer=None):
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("the 'model' prompt style needs a tokenizer with a chat template")
        messages = instruction_messages(instruction, input)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


ALPACA = Alpaca()
PROMPT_STYLES = {style.name: style for style in (ALPACA, ModelChatTemplate())}


def get_style(name):
    """The registered style called name; ValueError lists the names."""
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; choose one of {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def choose_style(requested, tokenizer, has_chat_rows):
    """The style train.py uses. auto: Alpaca rows alone keep the original prompt; chat data uses the model's own
    chat template when its tokenizer has one, else the Alpaca chat template (and so does a checkpoint that was
    trained in the Alpaca style: its template is the Alpaca one)."""
    if requested != AUTO:
        style = get_style(requested)
        if style.name == "model" and not tokenizer.chat_template:
            raise ValueError("--prompt_style model: this tokenizer has no chat template; use --prompt_style alpaca")
        return style
    trained_as = getattr(tokenizer, "init_kwargs", {}).get(STYLE_KEY)  # a checkpoint of ours carries its style
    if has_chat_rows and tokenizer.chat_template and trained_as != ALPACA.name:
        return PROMPT_STYLES["model"]
    return ALPACA


def save_style(tokenizer, style):
    """Record the style on the tokenizer: save_pretrained writes it into tokenizer_config.json."""
    tokenizer.init_kwargs[STYLE_KEY] = style.name


def load_style(tokenizer, checkpoint=None):
    """The style a checkpoint was trained with: its tokenizer_config.json (an adapter folder keeps its own), else
    the loaded tokenizer's; checkpoints from before the registry are Alpaca."""
    name = None
    config = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
    if config is not None and config.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get(STYLE_KEY)
    name = name or getattr(tokenizer, "init_kwargs", {}).get(STYLE_KEY) or ALPACA.name
    return get_style(name)
