"""Preference pairs for DPO: read, check, and turn into the prompt/chosen/rejected strings TRL's DPOTrainer takes.

Two shapes, detected per file, in JSON (a list) or JSONL (one object a line):

- ShareGPT, as LLaMA-Factory's dpo_en_demo.json: `conversations` (a list of {from: system/human/gpt, value}) that
  ends with a human turn, plus `chosen` and `rejected`, each {from: gpt, value}.
- TRL's: `prompt`, `chosen`, `rejected`, each a string or a list of {role, content} messages (conversational: the
  prompt ends with a user message, chosen and rejected are one assistant message each). A string prompt is the
  user's message.

The prompt is rendered with the tokenizer's chat template (add_generation_prompt=True): the Alpaca template that
train_dpo.py installs, so a multi-turn prompt becomes the Instruction (the last user turn) and the Input (the system
message and the earlier turns), as serve.py and llama.cpp will format it. Chosen and rejected are the answer text;
DPOTrainer appends EOS, as train.py does to an output.
"""

import logging

from alpaca_trainml import jsonio
from alpaca_trainml.cli import misspelled_fields
from alpaca_trainml.data.dataset import problem_report
from alpaca_trainml.data.formats import MESSAGE_ROLES as CHAT_ROLES
from alpaca_trainml.data.formats import SHAREGPT_ROLES, to_messages

logger = logging.getLogger(__name__)

SHAPES = {
    "sharegpt": "ShareGPT (conversations + chosen + rejected)",
    "trl": "TRL (prompt + chosen + rejected)",
}


def row_shape(row):
    """'sharegpt', 'trl', or None when the row is neither."""
    if isinstance(row, dict) and "conversations" in row:
        return "sharegpt"
    if isinstance(row, dict) and "prompt" in row:
        return "trl"
    return None


def _text_problem(value, where):
    """None, or what is wrong with a field that must be a non-empty string."""
    if not isinstance(value, str):
        return f"{where} must be a string, found {type(value).__name__}"
    if not value.strip():
        return f"{where} is empty"
    return None


def check_sharegpt_turns(turns, where="conversations"):
    """The problems of a ShareGPT prompt: a non-empty list of {from, value} ending with a human turn."""
    if not isinstance(turns, list) or not turns:
        return [f"'{where}' must be a non-empty list of {{from, value}} turns"]
    problems = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(f"{where}[{j}] must be an object with 'from' and 'value', found {type(turn).__name__}")
            continue
        if turn.get("from") not in SHAREGPT_ROLES:
            problems.append(f"{where}[{j}]: unknown 'from' {turn.get('from')!r} (expected system, human or gpt)")
        elif turn["from"] == "system" and j > 0:
            problems.append(f"{where}[{j}]: a system turn may only come first")
        problems += [p for p in [_text_problem(turn.get("value"), f"{where}[{j}].value")] if p]
    if isinstance(turns[-1], dict) and turns[-1].get("from") in SHAREGPT_ROLES and turns[-1]["from"] != "human":
        problems.append(f"'{where}' must end with a human turn (the one chosen and rejected answer)")
    return problems


def _sharegpt_answer(answer, key):
    """(text, problems) of a ShareGPT chosen/rejected: {from: gpt, value}."""
    if not isinstance(answer, dict):
        return None, [f"'{key}' must be an object {{from: gpt, value}}, found {type(answer).__name__}"]
    problems = [] if answer.get("from") == "gpt" else [f"'{key}.from' must be 'gpt', found {answer.get('from')!r}"]
    problem = _text_problem(answer.get("value"), f"'{key}.value'")
    return answer.get("value"), problems + ([problem] if problem else [])


def _messages_problems(messages, key):
    problems = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"'{key}'[{j}] must be an object with 'role' and 'content', found {type(m).__name__}")
        elif m.get("role") not in CHAT_ROLES:
            problems.append(f"'{key}'[{j}]: unknown role {m.get('role')!r} (expected system, user or assistant)")
        else:
            problems += [p for p in [_text_problem(m.get("content"), f"'{key}'[{j}].content")] if p]
    return problems


def _trl_prompt(prompt):
    """(messages, problems) of a TRL prompt: a string (the user's message) or messages ending with a user one."""
    if isinstance(prompt, str):
        problem = _text_problem(prompt, "'prompt'")
        return [{"role": "user", "content": prompt}], [problem] if problem else []
    if not isinstance(prompt, list) or not prompt:
        return None, [f"'prompt' must be a string or a non-empty list of messages, found {type(prompt).__name__}"]
    problems = _messages_problems(prompt, "prompt")
    if not problems and prompt[-1]["role"] != "user":
        problems.append("'prompt' must end with a user message (the one chosen and rejected answer)")
    return prompt, problems


def _trl_answer(answer, key):
    """(text, problems) of a TRL chosen/rejected: a string, or a list of one assistant message."""
    if isinstance(answer, str):
        problem = _text_problem(answer, f"'{key}'")
        return answer, [problem] if problem else []
    if not isinstance(answer, list) or len(answer) != 1:
        return None, [f"'{key}' must be a string or a list of one assistant message"]
    problems = _messages_problems(answer, key)
    if not problems and answer[0]["role"] != "assistant":
        problems.append(f"'{key}'[0] must be an assistant message, found role {answer[0]['role']!r}")
    return answer[0].get("content") if isinstance(answer[0], dict) else None, problems


def parse_row(row, shape):
    """({'messages', 'chosen', 'rejected'}, problems) for one row of a file of the given shape."""
    prompt_key = "conversations" if shape == "sharegpt" else "prompt"
    missing = [k for k in (prompt_key, "chosen", "rejected") if k not in row]
    if missing:
        typos = misspelled_fields(row, (prompt_key, "chosen", "rejected", "system"))
        return None, [*typos, f"missing field(s) {', '.join(repr(k) for k in missing)}"]
    if shape == "sharegpt":
        problems = check_sharegpt_turns(row["conversations"])
        messages = None if problems else to_messages(row)  # with LLaMA-Factory's optional system column
        answers = [_sharegpt_answer(row[k], k) for k in ("chosen", "rejected")]
    else:
        messages, problems = _trl_prompt(row["prompt"])
        answers = [_trl_answer(row[k], k) for k in ("chosen", "rejected")]
    problems += answers[0][1] + answers[1][1]
    if not problems and answers[0][0].strip() == answers[1][0].strip():
        problems.append("'chosen' and 'rejected' are the same answer (the pair teaches nothing)")
    return dict(messages=messages, chosen=answers[0][0], rejected=answers[1][0]), problems


def validate_pairs(rows, path):
    """The rows of one file as [{'messages', 'chosen', 'rejected'}], or ValueError listing every bad row."""
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows (or .jsonl, one object a line), found {type(rows)}")
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    shape = next((row_shape(r) for r in rows if row_shape(r)), None)
    if shape is None:
        raise ValueError(
            f"{path}: no row is a preference pair; expected {SHAPES['sharegpt']} or {SHAPES['trl']} (see README)"
        )
    pairs, problems = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"row {i}: expected an object, found {type(row).__name__}")
            continue
        if row_shape(row) != shape:
            found = SHAPES.get(row_shape(row), f"neither shape (fields: {', '.join(sorted(row)) or 'none'})")
            problems.append(f"row {i}: {found}, but the file's rows are {SHAPES[shape]}")
            continue
        pair, found = parse_row(row, shape)
        problems += [f"row {i}: {p}" for p in found]
        pairs.append(pair)
    if problems:
        raise ValueError(problem_report(path, problems))
    return pairs


def load_pairs(path):
    """Read and check a preference file (JSON or JSONL); errors name the file and the rows."""
    try:
        rows = jsonio.jload(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return validate_pairs(rows, path)


def bos_text_added(tokenizer, style):
    """How many leading characters of a rendered prompt to drop before DPOTrainer encodes it with the tokenizer's
    special tokens: a chat template that writes a BOS itself (as the Alpaca one does for tokenizers that add one)
    would otherwise give two. Chosen so that the prompt's ids are exactly the chat template's."""
    rendered = style.render(tokenizer, [{"role": "user", "content": "Name a colour."}])
    wanted = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    strip = 0
    bos = tokenizer.bos_token
    if bos and rendered.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        strip = len(bos) + (1 if rendered[len(bos) :].startswith(" ") else 0)
        if tokenizer(rendered[strip:])["input_ids"] != wanted:
            strip = len(bos)
    if tokenizer(rendered[strip:])["input_ids"] != wanted:
        logger.warning("the prompt's ids differ from the chat template's at the start (BOS and a space)")
    return strip


def to_trl_rows(pairs, tokenizer, style):
    """[{'prompt', 'chosen', 'rejected'}] strings for TRL: the prompt as the prompt style renders it, each answer as
    the style trains an answer (the text up to and with its end-of-turn token, where the model will stop)."""
    strip = bos_text_added(tokenizer, style)
    rows = []
    for p in pairs:
        prompt = style.render(tokenizer, p["messages"])
        answers = []
        for key in ("chosen", "rejected"):
            chat = p["messages"] + [{"role": "assistant", "content": p[key]}]
            text, trained = style.answer(tokenizer, chat, len(chat) - 1, prompt)
            answers.append(text[:trained])
        rows.append(dict(prompt=prompt[strip:], chosen=answers[0], rejected=answers[1]))
    return rows
