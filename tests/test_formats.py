"""formats.py through dataset.load_rows: the three shapes detected per file, ShareGPT to messages, and the
row-numbered report for bad chat data."""

import json
import logging

import pytest
from helpers import make_rows

from alpaca_trainml.data import dataset, formats


def chat(*turns, shape="messages"):
    """A chat row from (role, text) pairs, in OpenAI or ShareGPT form."""
    if shape == "messages":
        return {"messages": [{"role": r, "content": t} for r, t in turns]}
    names = {v: k for k, v in formats.SHAREGPT_ROLES.items()}
    return {"conversations": [{"from": names.get(r, r), "value": t} for r, t in turns]}


GOOD = [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Red."), ("user", "Another?")]
GOOD += [("assistant", "Blue.")]


def test_each_row_has_its_shape():
    assert formats.row_shape(make_rows(1)[0]) == "alpaca"
    assert formats.row_shape(chat(*GOOD)) == "messages"
    assert formats.row_shape(chat(*GOOD, shape="sharegpt")) == "sharegpt"
    assert formats.row_shape(["not", "an", "object"]) is None and formats.row_shape({"text": "x"}) is None


def test_sharegpt_becomes_the_same_messages_with_its_system_field_first():
    row = chat(*GOOD[1:], shape="sharegpt")
    assert formats.to_messages(row) == chat(*GOOD[1:])["messages"]
    assert formats.to_messages(dict(row, system="Be brief.")) == chat(*GOOD)["messages"]


def test_files_of_different_shapes_are_joined_in_order(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(make_rows(2)))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(chat(*GOOD, shape="sharegpt")) for _ in range(3)))
    (tmp_path / "c.json").write_text(json.dumps([chat(*GOOD)]))
    rows = dataset.load_rows(f"{tmp_path / 'a.json'},{tmp_path / 'b.jsonl'}, {tmp_path / 'c.json'}")
    assert [r.get("instruction") for r in rows[:2]] == [r["instruction"] for r in make_rows(2)]  # Alpaca rows as is
    assert rows[2:] == [chat(*GOOD)] * 4  # 3 ShareGPT rows and 1 OpenAI row, all as messages


def test_bad_chat_rows_are_listed_one_line_each_with_row_and_turn(data_file):
    rows = [
        chat(*GOOD),
        chat(("user", "Hi"), ("tool", "{}"), ("assistant", "Hello")),  # unknown role
        chat(("system", "Be brief."), ("user", "Hi")),  # no assistant turn
        chat(("user", "  "), ("assistant", "Hello")),  # empty content
        "a string",  # not an object
        make_rows(1)[0],  # an Alpaca row in a file of chats
        chat(("assistant", "I speak first."), ("user", "Hi")),  # nothing to answer
        {"messages": "Hi"},
    ]
    path = data_file(rows)
    with pytest.raises(ValueError) as e:
        dataset.load_rows(str(path))
    lines = str(e.value).splitlines()
    assert lines[0] == f"{path}: 7 problem(s) in the data:"
    assert lines[1:] == [
        "  row 1: messages[1].role is 'tool'; use system, user, assistant",
        "  row 2: no assistant turn: nothing to train on",
        "  row 3: messages[0].content is empty",
        "  row 4: expected an object with 'messages', found str",
        "  row 5: Alpaca (instruction/input/output) in a file of OpenAI messages (role/content); one file holds one "
        "shape (split it, and join the files with a comma in --data_path)",
        "  row 6: messages[0] is an assistant turn that does not follow a user turn",
        "  row 7: 'messages' must be a non-empty list of turns, found str",
    ]


def test_sharegpt_problems_use_its_own_key_names(data_file):
    rows = [chat(("user", "Hi"), ("bot", "Hello"), shape="sharegpt"), {"conversations": [{"from": "human"}]}]
    with pytest.raises(ValueError) as e:
        dataset.load_rows(str(data_file(rows)))
    message = str(e.value)
    assert "row 0: conversations[1].from is 'bot'; use system, human, gpt" in message
    assert "row 1: conversations[0].value must be a string, found NoneType" in message


def test_preference_rows_get_a_hint_towards_dpo(data_file):
    row = dict(chat(("user", "Hi"), shape="sharegpt"), chosen={"from": "gpt", "value": "a"})
    with pytest.raises(ValueError, match="row 0: no assistant turn.*preference data"):
        dataset.load_rows(str(data_file([row])))


def test_two_user_turns_in_a_row_are_kept_and_said_once(data_file, caplog):
    twice = chat(("user", "Hi"), ("user", "Are you there?"), ("assistant", "Yes."))
    with caplog.at_level(logging.WARNING, logger="alpaca_trainml.data.formats"):
        rows = dataset.load_rows(str(data_file([twice, chat(*GOOD), twice])))
    assert len(rows) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 row(s) have two user turns in a row (first: row 0 messages[1])" in warnings[0]


def test_every_bad_file_of_a_data_path_is_reported(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([chat(("user", "Hi"))]))
    (tmp_path / "b.json").write_text(json.dumps([{"output": "y"}]))
    with pytest.raises(ValueError) as e:
        dataset.load_rows(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'},{tmp_path / 'c.json'}")
    message = str(e.value)
    assert "a.json: 1 problem(s)" in message and "b.json: 1 problem(s)" in message and "c.json: no such file" in message


def test_a_misspelled_field_is_named_with_the_real_one(data_file):
    rows = make_rows(2) + [{"instruction": "Name a colour.", "outptu": "Red."}, {"instruction": "x", "output": "y"}]
    rows[1] = {"instruction": "Sum it.", "inptu": "1 2", "output": "3", "id": 7}  # an input that would be dropped
    with pytest.raises(ValueError) as e:
        dataset.load_rows(str(data_file(rows)))
    msg = str(e.value)
    assert "row 1: unknown field 'inptu' (did you mean input?)" in msg and "'id'" not in msg  # extra keys stay quiet
    assert "row 2: unknown field 'outptu' (did you mean output?)" in msg and "row 2: missing field 'output'" in msg
    assert "2 problem(s)" in msg or "3 problem(s)" in msg
