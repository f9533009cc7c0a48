"""Tests of train.py: the original public names, and how a user's mistake is answered before any model loads."""

import inspect

import pytest
from helpers import make_rows

import train
import utils
from alpaca_trainml import cli
from alpaca_trainml.training import sft


def test_the_original_train_py_names_are_importable_from_train_with_their_signatures():
    # the public names of the original Stanford Alpaca train.py
    names = """IGNORE_INDEX DEFAULT_PAD_TOKEN DEFAULT_EOS_TOKEN DEFAULT_BOS_TOKEN DEFAULT_UNK_TOKEN PROMPT_DICT
    ModelArguments DataArguments TrainingArguments SupervisedDataset DataCollatorForSupervisedDataset
    smart_tokenizer_and_embedding_resize _tokenize_fn preprocess make_supervised_data_module train""".split()
    assert [n for n in names if not hasattr(train, n)] == []
    assert train.PROMPT_DICT is utils.PROMPT_DICT and train.IGNORE_INDEX == -100
    tokens = (train.DEFAULT_PAD_TOKEN, train.DEFAULT_EOS_TOKEN, train.DEFAULT_BOS_TOKEN, train.DEFAULT_UNK_TOKEN)
    assert tokens == ("[PAD]", "</s>", "<s>", "<unk>")

    def params(f):
        return list(inspect.signature(f).parameters)

    assert params(train.smart_tokenizer_and_embedding_resize) == ["special_tokens_dict", "tokenizer", "model"]
    assert params(train.preprocess) == ["sources", "targets", "tokenizer"]
    assert params(train._tokenize_fn) == ["strings", "tokenizer"]
    assert params(train.make_supervised_data_module)[:2] == ["tokenizer", "data_args"]
    assert params(train.SupervisedDataset)[:2] == ["data_path", "tokenizer"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if train() gets as far as loading a model: user mistakes must be answered before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(sft, "load_model_and_tokenizer", refuse)


def run_train(argv, capsys):
    """train.py's command line as a user runs it: the one line it printed. Asserts it exited with status 2."""
    with pytest.raises(SystemExit) as exc:
        cli.run("train.py", train.train, argv)
    assert exc.value.code == 2  # cli.USAGE_EXIT
    return capsys.readouterr().err.rstrip("\n")


def test_bad_rows_are_listed_before_the_model_loads(data_file, tmp_path, no_model_load, capsys):
    rows = make_rows(3)
    rows[1]["output"] = ""
    del rows[2]["instruction"]
    path = data_file(rows)
    message = run_train(["--data_path", str(path), "--output_dir", str(tmp_path)], capsys)
    assert message.startswith("train.py: error: ") and str(path) in message
    assert "row 1: field 'output' is empty" in message and "row 2: missing field 'instruction'" in message


def test_a_missing_data_file_is_named(tmp_path, no_model_load, capsys):
    message = run_train(["--data_path", str(tmp_path / "nope.json"), "--output_dir", str(tmp_path)], capsys)
    assert f"{tmp_path / 'nope.json'}: no such file" in message


def test_a_missing_model_folder_is_named(tmp_path, data_file, monkeypatch, capsys):
    path = data_file(make_rows(3))
    missing = str(tmp_path / "no_model")
    message = run_train(["--model_name_or_path", missing, "--data_path", str(path), "--output_dir", "o"], capsys)
    assert message == f"train.py: error: {missing}: no such folder"


def test_a_misspelled_flag_is_refused_with_the_closest_spelling(tmp_path, no_model_load, capsys):
    message = run_train(["--output_dir", str(tmp_path), "--num_train_epocs", "2"], capsys)
    assert "unknown flag(s): --num_train_epocs (did you mean --num_train_epochs?)" in message


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--model_max_length", "0", "--model_max_length must be at least 8, got 0"),
        ("--val_set_size", "-1", "--val_set_size must be 0 or more, got -1"),
        ("--learning_rate=-2e-5", None, "--learning_rate must be above 0, got -2e-05"),
        ("--learning_rate", "fast", "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
    ],
)
def test_values_out_of_range_are_refused(flag, value, expected, tmp_path, no_model_load, capsys):
    message = run_train(["--output_dir", str(tmp_path), flag] + ([value] if value else []), capsys)
    assert message == f"train.py: error: {expected}"  # one line, no usage dump


def test_eval_path_and_val_set_size_together_are_refused(tmp_path, data_file, no_model_load, capsys):
    path = str(data_file(make_rows(3)))
    argv = ["--output_dir", str(tmp_path), "--data_path", path, "--eval_data_path", path, "--val_set_size", "1"]
    assert "give --eval_data_path or --val_set_size, not both" in run_train(argv, capsys)
