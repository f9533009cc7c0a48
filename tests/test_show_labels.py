"""show_labels.py and train.py --show_labels: the first examples as the loss sees them, on all three data shapes,
printed before any model loads."""

import io
import json
import re

import pytest
import torch
from helpers import load_tokenizer, make_rows

from alpaca_trainml import cli
from alpaca_trainml.data import dataset, prompts, show_labels
from alpaca_trainml.training import sft

CHATS = [
    [("system", "Be brief."), ("user", "Count the words."), ("assistant", "A chef writes a long letter.")],
    [("user", "Name the main subject."), ("assistant", "The river."), ("user", "Why?"), ("assistant", "It counts.")],
]
SHARE = {"system": "system", "user": "human", "assistant": "gpt"}
SHAPES = {
    "alpaca": make_rows(3),
    "messages": [{"messages": [{"role": r, "content": t} for r, t in c]} for c in CHATS],
    "sharegpt": [{"conversations": [{"from": SHARE[r], "value": t} for r, t in c]} for c in CHATS],
}


def test_runs_split_trained_from_untrained_positions():
    assert show_labels.runs(torch.tensor([-100, -100, 5, 6, -100, 7])) == [
        (0, 2, False),
        (2, 4, True),
        (4, 5, False),
        (5, 6, True),
    ]


def test_trained_runs_are_marked_and_coloured_on_a_terminal(bpe_tokenizer_dir):
    tok = load_tokenizer(bpe_tokenizer_dir)
    ids = torch.tensor(tok("the river counts", add_special_tokens=False)["input_ids"])
    labels = ids.clone()
    labels[:2] = -100
    plain = show_labels.render_example(tok, ids, labels)
    assert plain.replace("[[", "").replace("]]", "") == "the river counts" and plain.count("[[") == 1
    assert tok.decode(ids[2:]) in re.search(r"\[\[(.*)\]\]", plain).group(1)
    coloured = show_labels.render_example(tok, ids, labels, colour=True)
    assert show_labels.GREEN in coloured and "[[" not in coloured


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--show_labels loaded the model")

    monkeypatch.setattr(sft, "load_model_and_tokenizer", refuse)


@pytest.mark.parametrize("shape", SHAPES)
def test_train_py_prints_the_labels_of_every_shape_and_exits_before_the_model(
    shape, tiny_llama_dir, tmp_path, capsys, no_model
):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(SHAPES[shape]))
    argv = ["--model_name_or_path", str(tiny_llama_dir), "--data_path", str(path), "--output_dir", str(tmp_path)]
    assert cli.run("train.py", sft.train, argv + ["--show_labels", "2", "--model_max_length", "256"]) is None
    out = capsys.readouterr().out
    heads = re.findall(r"=== example (\d+) \(row (\d+)\): (\d+) tokens, (\d+) trained", out)
    assert [h[:2] for h in heads] == [("0", "0"), ("1", "1")]
    first_answer = "A chef writes a long letter." if shape != "alpaca" else SHAPES["alpaca"][0]["output"]
    assert f"[[{first_answer}</s>]]" in out and "2 of 3 examples" in out  # 3 rows; the chats: 1 + 2 answers
    assert out.count("[[") == 3  # one trained run in each example shown (the Alpaca style), and the legend
    # the same counts as the dataset train.py would train on (the spm tokenizer has no template: the Alpaca style)
    tok = prompts.ALPACA.install(load_tokenizer(tiny_llama_dir, max_length=256))
    data = dataset.SupervisedDataset(str(path), tok)
    for i, (_, _, total, trained) in enumerate(heads):
        assert (int(total), int(trained)) == (len(data[i]["labels"]), int((data[i]["labels"] != -100).sum()))
    assert not (tmp_path / "config.json").exists()  # nothing trained, nothing saved


def test_show_labels_tells_how_many_it_showed(bpe_tokenizer_dir):
    tok = prompts.ALPACA.install(load_tokenizer(bpe_tokenizer_dir, max_length=256))
    data = dataset.SupervisedDataset("rows", tok, rows=make_rows(2))
    out = io.StringIO()
    show_labels.show_labels(data, tok, 5, out)
    assert out.getvalue().count("=== example") == 2 and "2 of 2 examples shown" in out.getvalue()
