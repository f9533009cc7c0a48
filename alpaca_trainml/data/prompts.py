"""Prompt styles: everything about how a checkpoint is prompted, one class per style, and nothing about it elsewhere.

A style maps messages ([{"role", "content"}], the one form every data shape becomes first) to
- the prompt text (render, through the chat template the style installs on the tokenizer, and instruction_prompt
  for /instruct's instruction and input);
- the trained spans (answer: what an assistant turn adds after its prompt, and how much of it trains; encode);
- the stop tokens (end_of_turn, stop_token_ids): where generation, llama.cpp and Ollama stop;
- its Jinja chat template (install), which save_pretrained writes with the checkpoint, together with the style's
  name (the "prompt_style" key of tokenizer_config.json).

train.py picks a style (--prompt_style) and installs it; everything after reads it back from the checkpoint
(load_style): SFT and DPO data, --show_labels, InstructModel (inference.py, evaluate.py, serve.py), and
export_gguf.py. A chat is always prompted through the saved template, so serve.py, vLLM and llama.cpp build the same
prompt for it. To add a style, subclass PromptStyle (or one of the two below) and add an instance to PROMPT_STYLES.

    alpaca  the original's prompt (PROMPT_DICT), byte for byte, for instruction rows with the original's labels;
            chats through the Alpaca chat template (chat_template.py says where system text and earlier turns go)
    model   the tokenizer's own chat template (SmolLM2's ChatML, Llama 3's, ...); an instruction and its input
            become one user message
"""

import json
from pathlib import Path

import jinja2

from alpaca_trainml.data import alpaca_labels, conversations, ollama_template
from alpaca_trainml.data.chat_template import has_alpaca_template, install_chat_template
from alpaca_trainml.data.templates import PROMPT_DICT, STYLE_KEY, format_prompt

__all__ = ["PROMPT_DICT", "STYLE_KEY", "format_prompt", "PromptStyle", "Alpaca", "ModelChatTemplate", "get_style"]
AUTO = "auto"  # --prompt_style's default: alpaca for Alpaca rows; for chat data the model's template if it has one


def instruction_messages(instruction, input=None):
    """An Alpaca instruction (and input) as a chat: one user message, the input after a blank line."""
    return [{"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}]


class PromptStyle:
    """A prompt style: its template, its prompts, its trained spans and its stops (module docstring)."""

    name = ""
    roles = ("system", "developer", "user", "assistant")  # what render takes; anything else is refused by name
    add_special_tokens = True  # how instruction_prompt's text is tokenized

    def install(self, tokenizer):
        """Give the tokenizer this style's chat template and record the style's name (save_pretrained writes both)."""
        save_style(tokenizer, self)
        return tokenizer

    def adopt(self, tokenizer):
        """Make a loaded checkpoint's tokenizer prompt chats in this style (a no-op for checkpoints train.py saved)."""
        return tokenizer

    def template_messages(self, messages):
        """The messages as the chat template reads them (a data row's 'input' is the style's to place)."""
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def check_messages(self, messages):
        """ValueError naming the first message whose role this style cannot take."""
        for i, m in enumerate(messages):
            if m.get("role") not in self.roles:
                raise ValueError(
                    f"messages[{i}].role is {m.get('role')!r}; the {self.name!r} prompt style takes "
                    f"{', '.join(self.roles)}"
                )

    def render(self, tokenizer, messages, add_generation_prompt=True):
        """The text of a chat through the installed template. ValueError for a chat the style cannot take."""
        self.check_messages(messages)
        try:
            return tokenizer.apply_chat_template(
                self.template_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as e:  # the template's own raise_exception: a chat it refuses
            raise ValueError(f"the chat template cannot render this chat: {e}") from e

    def chat_ids(self, tokenizer, messages):
        """Token ids of a chat's prompt, exactly as servers that apply the saved template encode it."""
        return tokenizer(self.render(tokenizer, messages), add_special_tokens=False)["input_ids"]

    def instruction_prompt(self, tokenizer, instruction, input=None):
        """The prompt text for an instruction and its input (tokenized with add_special_tokens)."""
        return self.render(tokenizer, instruction_messages(instruction, input))

    def end_of_turn(self, tokenizer):
        """The special token that closes an assistant's turn in this style's template (None if it has none)."""
        raise NotImplementedError

    def stop_token_ids(self, tokenizer):
        """The ids generation stops at: EOS and the end-of-turn token."""
        tokens = {tokenizer.eos_token, self.end_of_turn(tokenizer)} - {None}
        return sorted({tokenizer.convert_tokens_to_ids(t) for t in tokens} - {None, tokenizer.unk_token_id})

    def stop_strings(self, tokenizer):
        """The stop texts for servers that take strings (Ollama's PARAMETER stop): the end-of-turn token and EOS."""
        return list(dict.fromkeys(t for t in (self.end_of_turn(tokenizer), tokenizer.eos_token) if t))

    def ollama_template(self, tokenizer):
        """The Go template for an Ollama Modelfile that prompts as render() does (ollama_template.py)."""
        adds_bos = tokenizer.bos_token and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        bos = tokenizer.bos_token if adds_bos else ""  # Ollama adds it itself, as the GGUF file says
        wrappers = ollama_template.turn_wrappers(lambda chat, gen: self.render(tokenizer, chat, gen), bos)
        return ollama_template.wrapper_go_template(*wrappers)

    def answer(self, tokenizer, messages, k, prompt):
        """(text, trained length): what the answer messages[k] adds after `prompt`, and how much of it trains."""
        raise NotImplementedError

    def encode(self, tokenizer, chats, stats, by_construction=False):
        """Per chat, [(input_ids, labels)]: the loss on every assistant turn (conversations.py)."""
        return [conversations.encode_conversation(tokenizer, messages, self, stats) for messages in chats]


class Alpaca(PromptStyle):
    """The original Alpaca prompt; the tokenizer adds its BOS as train.py's original preprocessing does."""

    name = "alpaca"
    templates = PROMPT_DICT

    def install(self, tokenizer):
        install_chat_template(tokenizer)
        return super().install(tokenizer)

    def instruction_prompt(self, tokenizer, instruction, input=None):
        return format_prompt(instruction, input)

    def adopt(self, tokenizer):
        """A checkpoint from before the style registry (no template, or its base's) gets the Alpaca template it was
        trained on; train.py's Alpaca checkpoints already carry it."""
        return tokenizer if has_alpaca_template(tokenizer) else install_chat_template(tokenizer)

    def template_messages(self, messages):
        """A data row's input goes where the Alpaca template puts context, as a system message before its turn: a
        row's [user + input] renders as format_prompt(instruction, input)."""
        out = []
        for m in messages:
            out += [{"role": "system", "content": m["input"]}] if m.get("input") else []
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def end_of_turn(self, tokenizer):
        return tokenizer.eos_token  # an answer ends with EOS, as Alpaca rows do

    def ollama_template(self, tokenizer):
        return ollama_template.alpaca_go_template()

    def answer(self, tokenizer, messages, k, prompt):
        text = messages[k]["content"] + tokenizer.eos_token
        return text, len(text)

    def encode(self, tokenizer, chats, stats, by_construction=False):
        """Instruction rows (one user turn with its 'input', then the answer) keep the original's labels, byte for
        byte (alpaca_labels.py); chats go through the Alpaca chat template."""
        rows = [i for i, m in enumerate(chats) if is_instruction_row(m)]
        out = [None] * len(chats)
        if rows:
            sources = [format_prompt(chats[i][0]["content"], chats[i][0]["input"]) for i in rows]
            targets = [f"{chats[i][1]['content']}{tokenizer.eos_token}" for i in rows]
            label = alpaca_labels.preprocess_by_construction if by_construction else alpaca_labels.preprocess
            data = label(sources, targets, tokenizer)
            for i, ids, labels in zip(rows, data["input_ids"], data["labels"]):
                out[i] = [(ids, labels)]
        rest = [i for i in range(len(chats)) if out[i] is None]
        for i, examples in zip(rest, super().encode(tokenizer, [chats[i] for i in rest], stats)):
            out[i] = examples
        return out


def is_instruction_row(messages):
    """An Alpaca row as messages (formats.to_messages): a user turn carrying the row's 'input', then the answer."""
    return len(messages) == 2 and "input" in messages[0] and messages[1]["role"] == "assistant"


_END_OF_TURN = {}  # (template, special tokens, EOS, BOS) -> the end-of-turn token the template writes


class ModelChatTemplate(PromptStyle):
    """The tokenizer's own chat template, which writes any BOS itself."""

    name = "model"
    add_special_tokens = False

    def install(self, tokenizer):
        if not tokenizer.chat_template:
            raise ValueError(f"prompt style {self.name!r} needs the tokenizer's own chat template, and it has none")
        return super().install(tokenizer)

    def template_messages(self, messages):
        """A data row's input joins its instruction (instruction_messages); every role goes to the template as is."""
        out = super().template_messages(messages)
        for m, t in zip(messages, out):
            if m.get("input"):
                t["content"] = instruction_messages(m["content"], m["input"])[0]["content"]
        return out

    def end_of_turn(self, tokenizer):
        """The first special token the template writes after an assistant's text (ChatML's <|im_end|>, Llama 3's
        <|eot_id|>, Gemma's <end_of_turn>), else EOS. Found once per template: answer() asks for every trained turn."""
        key = (tokenizer.chat_template, tuple(tokenizer.all_special_tokens), tokenizer.eos_token, tokenizer.bos_token)
        if key not in _END_OF_TURN:
            _END_OF_TURN[key] = self._find_end_of_turn(tokenizer)
        return _END_OF_TURN[key]

    def _find_end_of_turn(self, tokenizer):
        marker = "\u2063answer\u2063"
        chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        after = text[text.index(marker) + len(marker) :]
        found = [(after.find(t), t) for t in tokenizer.all_special_tokens if t and t in after]
        return min(found)[1] if found else tokenizer.eos_token

    def answer(self, tokenizer, messages, k, prompt):
        full = self.render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(
                "the model's chat template renders an answer differently from the prompt that precedes it, so the "
                "trained span cannot be found exactly; use --prompt_style alpaca"
            )
        text, end_token = full[len(prompt) :], self.end_of_turn(tokenizer)
        end = text.rfind(end_token) if end_token else -1
        return text, end + len(end_token) if end >= 0 else len(text)  # ChatML's newline after <|im_end|> not trained


ALPACA = Alpaca()
PROMPT_STYLES = {style.name: style for style in (ALPACA, ModelChatTemplate())}


def get_style(name):
    """The registered style called name; ValueError lists the names."""
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; choose one of {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def choose_style(requested, tokenizer, has_chat_rows):
    """The style train.py and train_dpo.py use. auto: a checkpoint of ours keeps the style it was trained with; else
    Alpaca rows alone keep the original prompt, and chat data uses the model's own chat template when its tokenizer
    has one, else the Alpaca chat template."""
    if requested != AUTO:
        style = get_style(requested)
        if style.name == "model" and not tokenizer.chat_template:
            raise ValueError("--prompt_style model: this tokenizer has no chat template; use --prompt_style alpaca")
        return style
    trained_as = getattr(tokenizer, "init_kwargs", {}).get(STYLE_KEY)  # a checkpoint of ours carries its style
    if trained_as in PROMPT_STYLES:  # fine-tuning it again (SFT, DPO) keeps the prompt it is served with
        return PROMPT_STYLES[trained_as]
    if has_chat_rows and tokenizer.chat_template:
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
