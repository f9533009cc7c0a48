"""Unit tests of train.py and utils.py: templates, labels, special tokens, validation, legacy flags, I/O."""

import pytest
from helpers import load_tokenizer, make_rows

import dataset
import train


def test_training_data_with_no_trainable_label_at_all_is_refused(spm_tokenizer_dir, data_file):
    tokenizer = load_tokenizer(spm_tokenizer_dir, max_length=32)  # shorter than the template alone
    args = train.DataArguments(data_path=str(data_file(make_rows(4))))
    with pytest.raises(ValueError, match="no row has a trainable label.*raise --model_max_length"):
        dataset.make_supervised_data_module(tokenizer, args)


def test_the_original_train_py_names_are_importable_from_train_with_their_signatures():
    import inspect

    import utils

    # the public names of the original Stanford Alpaca train.py
    for name in (
        "IGNORE_INDEX",
        "DEFAULT_PAD_TOKEN",
        "DEFAULT_EOS_TOKEN",
        "DEFAULT_BOS_TOKEN",
        "DEFAULT_UNK_TOKEN",
        "PROMPT_DICT",
        "ModelArguments",
        "DataArguments",
        "TrainingArguments",
        "SupervisedDataset",
        "DataCollatorForSupervisedDataset",
        "smart_tokenizer_and_embedding_resize",
        "_tokenize_fn",
        "preprocess",
        "make_supervised_data_module",
        "train",
    ):
        assert hasattr(train, name), name
    assert train.PROMPT_DICT is utils.PROMPT_DICT and train.IGNORE_INDEX == -100
    assert (train.DEFAULT_PAD_TOKEN, train.DEFAULT_EOS_TOKEN, train.DEFAULT_BOS_TOKEN, train.DEFAULT_UNK_TOKEN) == (
        "[PAD]",
        "</s>",
        "<s>",
        "<unk>",
    )
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(train.smart_tokenizer_and_embedding_resize) == ["special_tokens_dict", "tokenizer", "model"]
    assert params(train.preprocess) == ["sources", "targets", "tokenizer"]
    assert params(train._tokenize_fn) == ["strings", "tokenizer"]
    assert params(train.make_supervised_data_module)[:2] == ["tokenizer", "data_args"]
    assert params(train.SupervisedDataset)[:2] == ["data_path", "tokenizer"]
