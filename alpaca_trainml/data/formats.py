"""The three data shapes train.py reads, detected per file: their detection, validation and conversion to chats.

    alpaca    {"instruction": ..., "input": ..., "output": ...}
    messages  {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}   (OpenAI)
    sharegpt  {"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}   (optional "system": ...)

One file holds one shape; files of different shapes can be joined in one --data_path. Chat rows are validated here
and become OpenAI messages (to_messages), the one form the rest of the code reads.
"""

import logging

from alpaca_trainml.cli import misspelled_fields

logger = logging.getLogger(__name__)

ALPACA, MESSAGES, SHAREGPT = "alpaca", "messages", "sharegpt"
SHAPE_NAMES = {
    ALPACA: "Alpaca (instruction/input/output)",
    MESSAGES: "OpenAI messages (role/content)",
    SHAREGPT: "ShareGPT conversations (from/value)",
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # ShareGPT `from` -> OpenAI role
MESSAGE_ROLES = ("system", "user", "assistant")
# per chat shape: the key holding the turns, and each turn's role and text keys
TURN_KEYS = {MESSAGES: ("messages", "role", "content"), SHAREGPT: ("conversations", "from", "value")}


def row_shape(row):
    """The shape one row has, or None (not an object, or none of the shapes' keys)."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return MESSAGES
    if "conversations" in row:
        return SHAREGPT
    if {"instruction", "input", "output"} & row.keys():
        return ALPACA
    return None


def file_shape(rows):
    """The shape of a file: its first row's that has one (Alpaca if none has)."""
    return next((shape for shape in map(row_shape, rows) if shape is not None), ALPACA)


def to_messages(row):
    """A chat row (ShareGPT or OpenAI messages) as OpenAI messages: [{"role", "content"}, ...].

    ShareGPT's `from` maps through SHAREGPT_ROLES, and a row's top-level "system" text becomes a first system turn.
    The row must be valid (validate_chat_row returns no problems)."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    system = row.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]


def validate_chat_row(row, shape):
    """(problems, double_user): what is wrong with one chat row (each a phrase naming the turn), and the index of
    a user turn that follows another user turn (allowed), or None."""
    key, role_key, text_key = TURN_KEYS[shape]
    roles = MESSAGE_ROLES if shape == MESSAGES else tuple(SHAREGPT_ROLES)
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        found = type(turns).__name__ if not isinstance(turns, list) else "an empty list"
        return [f"'{key}' must be a non-empty list of turns, found {found}"], None
    problems, double_user, previous = [], None, None
    for j, turn in enumerate(turns):
        where = f"{key}[{j}]"
        if not isinstance(turn, dict):
            problems.append(
                f"{where} must be an object with '{role_key}' and '{text_key}', found {type(turn).__name__}"
            )
            continue
        role, text = turn.get(role_key), turn.get(text_key)
        if role not in roles:
            problems.append(f"{where}.{role_key} is {role!r}; use {', '.join(roles)}")
            continue
        role = SHAREGPT_ROLES.get(role, role) if shape == SHAREGPT else role
        if not isinstance(text, str):
            problems.append(f"{where}.{text_key} must be a string, found {type(text).__name__}")
        elif not text.strip():
            problems.append(f"{where}.{text_key} is empty")
        if role == "assistant" and previous != "user":
            problems.append(f"{where} is an assistant turn that does not follow a user turn")
        if role == "user" and previous == "user" and double_user is None:
            double_user = j
        previous = role
    if not problems and "assistant" not in [SHAREGPT_ROLES.get(t.get(role_key), t.get(role_key)) for t in turns]:
        hint = " (chosen/rejected rows are preference data: see train_dpo.py)" if "chosen" in row else ""
        problems.append(f"no assistant turn: nothing to train on{hint}")
    return problems, double_user


def validate_alpaca_row(row):
    """What is wrong with one Alpaca row, as the original validation words it, and the fields that look misspelled."""
    problems = misspelled_fields(row, ("instruction", "input", "output"))
    for key in ("instruction", "output"):
        if key not in row:
            problems.append(f"missing field '{key}'")
        elif not isinstance(row[key], str):
            problems.append(f"field '{key}' must be a string, found {type(row[key]).__name__}")
        elif not row[key].strip():
            problems.append(f"field '{key}' is empty")
    if row.get("input") is not None and not isinstance(row["input"], str):
        problems.append(f"field 'input' must be a string, found {type(row['input']).__name__}")
    return problems


def row_problems(rows, path):
    """Every problem of a file's rows, as 'row i: ...' lines, for the file's shape (file_shape). Logs once when
    rows have two user turns in a row."""
    shape = file_shape(rows)
    problems, double_users = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            expected = "instruction/input/output" if shape == ALPACA else f"'{TURN_KEYS[shape][0]}'"
            problems.append(f"row {i}: expected an object with {expected}, found {type(row).__name__}")
            continue
        found = row_shape(row)
        if found not in (None, shape):
            problems.append(
                f"row {i}: {SHAPE_NAMES[found]} in a file of {SHAPE_NAMES[shape]}; one file holds one shape "
                "(split it, and join the files with a comma in --data_path)"
            )
            continue
        if shape == ALPACA:
            problems += [f"row {i}: {p}" for p in validate_alpaca_row(row)]
            continue
        found, double_user = validate_chat_row(row, shape)
        problems += [f"row {i}: {p}" for p in found]
        if double_user is not None:
            double_users.append(f"row {i} {TURN_KEYS[shape][0]}[{double_user}]")
    if double_users:
        logger.warning(
            "%s: %d row(s) have two user turns in a row (first: %s); they are trained as they are",
            path,
            len(double_users),
            double_users[0],
        )
    return shape, problems
