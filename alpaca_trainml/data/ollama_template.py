"""Ollama's side of a prompt style: the Go template (Modelfile TEMPLATE) that builds the same prompt as the style's
Jinja chat template, for the chats Ollama sends (.Messages, each with .Role and .Content).

- The Alpaca style's template is written from PROMPT_DICT with the placement rule of chat_template.py (system text
  first in the Input, then the earlier turns as "User: ..." / "Assistant: ..." lines). Go templates cannot trim
  text, so a message's surrounding whitespace is kept (the Jinja template trims it).
- A model's own template is read off its Jinja template by rendering probe chats: what it writes around a system,
  a user and an assistant message, the generation prompt, and a default system block it adds when a chat has none
  (SmolLM2's). Templates that are not turn-by-turn wrappers (Llama 2's [INST], which folds the system into the
  first user turn) are refused with a ValueError; write their TEMPLATE by hand.
"""

from alpaca_trainml.data.templates import PROMPT_DICT

MARK = "\u2063{}\u2063"  # invisible separators around probe texts: found exactly, never produced by a template


def _go_text(text):
    """Literal text in a Go template: only "{{" needs quoting."""
    return text.replace("{{", '{{ "{{" }}')


def _go_string(text):
    """A Go string constant."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def alpaca_go_template():
    """The Alpaca placement in Go's template language, for Ollama's .Messages."""
    head_in, rest = PROMPT_DICT["prompt_input"].split("{instruction}")
    mid_in, tail_in = rest.split("{input}")
    head_no, tail_no = PROMPT_DICT["prompt_no_input"].split("{instruction}")
    return "".join(
        [
            '{{ $sys := "" }}{{ $turns := "" }}{{ $inst := "" }}',
            "{{ range $i, $m := .Messages }}",
            "{{ if eq (len (slice $.Messages $i)) 1 }}{{ $inst = $m.Content }}",
            '{{ else if or (eq $m.Role "system") (eq $m.Role "developer") }}',
            '{{ if $sys }}{{ $sys = printf "%s\\n\\n%s" $sys $m.Content }}{{ else }}{{ $sys = $m.Content }}{{ end }}',
            "{{ else }}",
            '{{ $who := "Assistant" }}{{ if eq $m.Role "user" }}{{ $who = "User" }}{{ end }}',
            '{{ if $turns }}{{ $turns = printf "%s\\n%s: %s" $turns $who $m.Content }}',
            '{{ else }}{{ $turns = printf "%s: %s" $who $m.Content }}{{ end }}',
            "{{ end }}{{ end }}",
            '{{ $ctx := $sys }}{{ if and $sys $turns }}{{ $ctx = printf "%s\\n\\n%s" $sys $turns }}',
            "{{ else if $turns }}{{ $ctx = $turns }}{{ end }}",
            "{{ if $ctx }}" + _go_text(head_in) + "{{ $inst }}" + _go_text(mid_in) + "{{ $ctx }}" + _go_text(tail_in),
            "{{ else }}" + _go_text(head_no) + "{{ $inst }}" + _go_text(tail_no) + "{{ end }}",
        ]
    )


def _after(text, head, what):
    if not text.startswith(head):
        raise ValueError(f"the chat template does not render {what} as a turn of its own after the earlier ones")
    return text[len(head) :]


def _around(text, marker, what):
    """(before, after) the marker in the text of one rendered turn."""
    if text.count(marker) != 1:
        raise ValueError(f"the chat template does not write {what}'s text exactly once")
    before, after = text.split(marker)
    return before, after


def turn_wrappers(render, bos=""):
    """{role: (prefix, suffix)}, the generation prompt and the default system block of a turn-by-turn template.

    render(messages, add_generation_prompt) -> text. A leading BOS text is dropped (llama.cpp and Ollama add the BOS
    as the GGUF file says)."""

    def r(chat, gen=False):
        text = render(chat, gen)
        return text[len(bos) :] if bos and text.startswith(bos) else text

    sys, user, asst = ({"role": role, "content": MARK.format(role)} for role in ("system", "user", "assistant"))
    one, two, three = r([sys]), r([sys, user]), r([sys, user, asst])
    wrappers = {"system": _around(one, MARK.format("system"), "a system message")}
    wrappers["user"] = _around(_after(two, one, "a user message"), MARK.format("user"), "a user message")
    wrappers["assistant"] = _around(_after(three, two, "an answer"), MARK.format("assistant"), "an answer")
    generation = _after(r([sys, user], True), two, "the generation prompt")
    alone = r([user])
    user_turn = "".join((wrappers["user"][0], MARK.format("user"), wrappers["user"][1]))
    if not alone.endswith(user_turn):
        raise ValueError("the chat template writes a user message differently when no system message precedes it")
    return wrappers, generation, alone[: -len(user_turn)]


def wrapper_go_template(wrappers, generation, default_system):
    """A Go template writing each message inside its role's wrapper, then the generation prompt."""
    parts = ["{{ if .Messages }}"]
    if default_system:
        parts.append('{{ if ne (index .Messages 0).Role "system" }}' + _go_text(default_system) + "{{ end }}")
    parts.append("{{ range .Messages }}")
    for i, role in enumerate(("system", "user", "assistant")):
        prefix, suffix = wrappers[role]
        keyword = "if" if i == 0 else "else if"
        parts.append(f"{{{{ {keyword} eq .Role {_go_string(role)} }}}}{_go_text(prefix)}{{{{ .Content }}}}")
        parts.append(_go_text(suffix))
    prefix, suffix = wrappers["user"]
    if prefix.count("user") == 1:  # a template that writes the role's name (ChatML) writes any other role alike
        generic = _go_text(prefix).replace("user", "{{ .Role }}")
        parts.append("{{ else }}" + generic + "{{ .Content }}" + _go_text(suffix))
    parts.append("{{ end }}{{ end }}" + _go_text(generation) + "{{ end }}")
    return "".join(parts)


def modelfile(gguf_path, template, stops):
    """The text of an Ollama Modelfile; gguf_path relative to the Modelfile's folder."""
    lines = [
        f"FROM {gguf_path if gguf_path.startswith(('/', '.')) else './' + gguf_path}",
        f'TEMPLATE """{template}"""',
    ]
    lines += [f"PARAMETER stop {_go_string(s)}" for s in stops]
    return "\n".join(lines) + "\n"
