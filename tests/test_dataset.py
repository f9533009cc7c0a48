"""Tests of dataset.py: validation, the original labels, masking by construction, .jsonl."""

import json

import pytest
import torch
from helpers import load_tokenizer, make_rows, original_labels

import train
from alpaca_trainml.data import alpaca_labels, dataset


@pytest.mark.parametrize("which", ["spm_tokenizer_dir", "bpe_tokenizer_dir"])
def test_labels_equal_the_original_algorithm(which, request):
    tokenizer = load_tokenizer(request.getfixturevalue(which), max_length=256)
    rows = make_rows(40, seed=7)
    rows.append({"instruction": "Repeat the word many times.", "input": "", "output": "the river " * 200})  # truncated
    sources, targets = alpaca_labels.build_example_texts(rows, tokenizer.eos_token)
    got = alpaca_labels.preprocess(sources, targets, tokenizer)
    want_ids, want_labels = original_labels(sources, targets, tokenizer)
    assert len(got["input_ids"]) == len(want_ids) == 41
    for a, b, c, d in zip(got["input_ids"], want_ids, got["labels"], want_labels):
        assert torch.equal(a, b) and torch.equal(c, d)
    assert len(got["input_ids"][-1]) == 256  # model_max_length above: the long row is cut there
    assert all((lab != -100).any() for lab in got["labels"])


def test_dataset_counts_truncated_and_fully_masked_rows(spm_tokenizer_dir, data_file):
    tokenizer = load_tokenizer(spm_tokenizer_dir, max_length=256)
    long_prompt = {"instruction": "Summarize the text. " * 100, "input": "", "output": "Short."}  # prompt alone > 256
    ds = dataset.SupervisedDataset(str(data_file(make_rows(5) + [long_prompt])), tokenizer)
    assert len(ds) == 6 and ds.num_truncated == 1 and ds.num_fully_masked == 1
    assert set(ds[0]) == {"input_ids", "labels"}


def test_mask_by_construction_trains_exactly_the_output(bpe_tokenizer_dir):
    tokenizer = load_tokenizer(bpe_tokenizer_dir, max_length=512)
    sources, targets = alpaca_labels.build_example_texts(make_rows(10, seed=3), tokenizer.eos_token)
    got = alpaca_labels.preprocess_by_construction(sources, targets, tokenizer)
    for ids, labels, target in zip(got["input_ids"], got["labels"], targets):
        trained = labels[labels != -100].tolist()
        assert trained == tokenizer(target, add_special_tokens=False)["input_ids"]
        assert ids[-len(trained) :].tolist() == trained


def test_validation_lists_every_problem_with_file_row_and_field(data_file):
    rows = make_rows(4) + [
        {"input": "x", "output": "y"},
        {"instruction": 3, "output": "y"},
        {"instruction": "ok", "output": "   "},
        "not a row",
        {"instruction": "a", "output": "b", "input": 5},
    ]
    path = data_file(rows)
    with pytest.raises(ValueError) as e:
        dataset.load_rows(str(path))
    msg = str(e.value)
    assert str(path) in msg and "5 problem(s)" in msg
    for expected in [
        "row 4: missing field 'instruction'",
        "row 5: field 'instruction' must be a string, found int",
        "row 6: field 'output' is empty",
        "row 7: expected an object",
        "row 8: field 'input' must be a string",
    ]:
        assert expected in msg


def test_validation_rejects_non_lists_and_bad_json_and_caps_the_report(tmp_path, data_file):
    with pytest.raises(ValueError, match="expected a JSON list"):
        dataset.load_rows(str(data_file({"instruction": "x"})))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        dataset.load_rows(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        dataset.load_rows(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"and 30 more"):  # 50 bad rows, 20 shown (MAX_REPORTED_PROBLEMS)
        dataset.load_rows(str(data_file([{"output": "y"}] * 50)))


def test_jsonl_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_rows(3)) + "\n")
    assert [r["instruction"] for r in dataset.load_rows(str(path))] == [r["instruction"] for r in make_rows(3)]


def test_training_data_with_no_trainable_label_at_all_is_refused(spm_tokenizer_dir, data_file):
    tokenizer = load_tokenizer(spm_tokenizer_dir, max_length=32)  # shorter than the template alone
    args = train.DataArguments(data_path=str(data_file(make_rows(4))))
    with pytest.raises(ValueError, match="no row has a trainable label.*raise --model_max_length"):
        dataset.make_supervised_data_module(tokenizer, args)
