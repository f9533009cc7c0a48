"""Unit tests of train.py and utils.py: templates, labels, special tokens, validation, legacy flags, I/O."""

import json

import pytest
import torch
import transformers
from helpers import make_rows

import train
import utils


def test_templates_are_byte_for_byte_the_originals():
    # the strings Alpaca-7B was trained on; any drift changes what a released model sees
    assert utils.PROMPT_DICT["prompt_no_input"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response:"
    )
    assert utils.PROMPT_DICT["prompt_input"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    )
    assert utils.format_prompt("Add 2 and 3.", "").endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:")
    assert "### Input:\nx y\n\n" in utils.format_prompt("Sort.", "x y")
    # the original public names stay importable from train
    assert train.PROMPT_DICT is utils.PROMPT_DICT and train.IGNORE_INDEX == -100
    assert (train.DEFAULT_PAD_TOKEN, train.DEFAULT_EOS_TOKEN, train.DEFAULT_BOS_TOKEN, train.DEFAULT_UNK_TOKEN) == (
        "[PAD]",
        "</s>",
        "<s>",
        "<unk>",
    )


def original_labels(sources, targets, tokenizer):
    """A plain re-statement of the original Alpaca preprocess(): one string at a time, return_tensors='pt'."""

    def tok(strings):
        out = [
            tokenizer(
                s, return_tensors="pt", padding="longest", max_length=tokenizer.model_max_length, truncation=True
            ).input_ids[0]
            for s in strings
        ]
        return out, [t.ne(tokenizer.pad_token_id).sum().item() for t in out]

    input_ids, _ = tok([s + t for s, t in zip(sources, targets)])
    _, source_lens = tok(sources)
    labels = [x.clone() for x in input_ids]
    for label, n in zip(labels, source_lens):
        label[:n] = -100
    return input_ids, labels


def load_tokenizer(path, max_length=64):
    tok = transformers.AutoTokenizer.from_pretrained(path, model_max_length=max_length, padding_side="right")
    tok.add_special_tokens(train.missing_special_tokens(tok))
    return tok


@pytest.mark.parametrize("which", ["spm_tokenizer_dir", "bpe_tokenizer_dir"])
def test_labels_equal_the_original_algorithm(which, request):
    tokenizer = load_tokenizer(request.getfixturevalue(which), max_length=256)
    rows = make_rows(40, seed=7)
    rows.append({"instruction": "Repeat the word many times.", "input": "", "output": "the river " * 200})  # truncated
    sources, targets = train.build_example_texts(rows, tokenizer.eos_token)
    got = train.preprocess(sources, targets, tokenizer)
    want_ids, want_labels = original_labels(sources, targets, tokenizer)
    assert len(got["input_ids"]) == len(want_ids) == 41
    for a, b, c, d in zip(got["input_ids"], want_ids, got["labels"], want_labels):
        assert torch.equal(a, b) and torch.equal(c, d)
    assert len(got["input_ids"][-1]) == 256  # model_max_length above: the long row is cut there
    assert all((lab != -100).any() for lab in got["labels"])


def test_dataset_counts_truncated_and_fully_masked_rows(spm_tokenizer_dir, data_file):
    tokenizer = load_tokenizer(spm_tokenizer_dir, max_length=256)
    long_prompt = {"instruction": "Summarize the text. " * 100, "input": "", "output": "Short."}  # prompt alone > 256
    ds = train.SupervisedDataset(str(data_file(make_rows(5) + [long_prompt])), tokenizer)
    assert len(ds) == 6 and ds.num_truncated == 1 and ds.num_fully_masked == 1
    assert set(ds[0]) == {"input_ids", "labels"}


def test_training_data_with_no_trainable_label_at_all_is_refused(spm_tokenizer_dir, data_file):
    tokenizer = load_tokenizer(spm_tokenizer_dir, max_length=32)  # shorter than the template alone
    args = train.DataArguments(data_path=str(data_file(make_rows(4))))
    with pytest.raises(ValueError, match="no row has a trainable label.*raise --model_max_length"):
        train.make_supervised_data_module(tokenizer, args)


def test_resume_skips_a_checkpoint_that_was_killed_while_saving(tmp_path):
    for step in (2, 9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 9):  # checkpoint-10 has no trainer_state.json: the run died while writing it
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert train.last_complete_checkpoint(tmp_path) == str(
        tmp_path / "checkpoint-9"
    )  # 10 > 9 numerically, 9 > 10 as text
    assert train.last_complete_checkpoint(tmp_path / "missing") is None


def test_mask_by_construction_trains_exactly_the_output(bpe_tokenizer_dir):
    tokenizer = load_tokenizer(bpe_tokenizer_dir, max_length=512)
    sources, targets = train.build_example_texts(make_rows(10, seed=3), tokenizer.eos_token)
    got = train.preprocess_by_construction(sources, targets, tokenizer)
    for ids, labels, target in zip(got["input_ids"], got["labels"], targets):
        trained = labels[labels != -100].tolist()
        assert trained == tokenizer(target, add_special_tokens=False)["input_ids"]
        assert ids[-len(trained) :].tolist() == trained


def test_missing_special_tokens_are_added_with_mean_rows(bpe_tokenizer_dir, tmp_path):
    from helpers import build_tiny_llama

    model_dir = build_tiny_llama(bpe_tokenizer_dir, tmp_path / "m")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    missing = train.missing_special_tokens(tokenizer)
    assert missing == {"pad_token": "[PAD]", "bos_token": "<s>", "unk_token": "<unk>"}  # the BPE fixture has only EOS
    train.smart_tokenizer_and_embedding_resize(missing, tokenizer, model)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == old_in.shape[0] + 3 == len(tokenizer)
    torch.testing.assert_close(new_in[:-3], old_in)
    for row in range(-3, 0):
        torch.testing.assert_close(new_in[row], old_in.mean(0))
        torch.testing.assert_close(new_out[row], old_out.mean(0))
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == len(tokenizer) - 3


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
        train.load_rows(str(path))
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
        train.load_rows(str(data_file({"instruction": "x"})))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        train.load_rows(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        train.load_rows(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"and 30 more"):  # 50 bad rows, 20 shown (MAX_REPORTED_PROBLEMS)
        train.load_rows(str(data_file([{"output": "y"}] * 50)))


def test_jsonl_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in make_rows(3)) + "\n")
    assert [r["instruction"] for r in train.load_rows(str(path))] == [r["instruction"] for r in make_rows(3)]


SEED_ARGS = [
    "--model_name_or_path",
    "m",
    "--data_path",
    "d.json",
    "--bf16",
    "True",
    "--output_dir",
    "o",
    "--num_train_epochs",
    "3",
    "--per_device_train_batch_size",
    "16",
    "--gradient_accumulation_steps",
    "2",
    "--gradient_checkpointing",
    "--evaluation_strategy",
    "no",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2000",
    "--save_total_limit",
    "1",
    "--learning_rate",
    "2e-5",
    "--weight_decay",
    "0.",
    "--warmup_ratio",
    "0.03",
    "--lr_scheduler_type",
    "cosine",
    "--logging_steps",
    "1",
    "--tf32",
    "True",
    "--report_to",
    "none",
    "--fsdp",
    "full_shard auto_wrap",
    "--fsdp_transformer_layer_cls_to_wrap",
    "LlamaDecoderLayer",
]


def test_legacy_flags_map_to_current_arguments_on_cpu():
    argv, notes = train.translate_legacy_args(SEED_ARGS, has_gpu=False)
    assert "--evaluation_strategy" not in argv and "--warmup_ratio" not in argv and "--bf16" not in argv
    assert len(notes) == 5  # eval strategy, warmup, fsdp layer class, bf16, tf32: one line each
    _, _, args = transformers.HfArgumentParser(
        (train.ModelArguments, train.DataArguments, train.TrainingArguments)
    ).parse_args_into_dataclasses(args=argv)
    assert args.eval_strategy == "no" and args.warmup_steps == 0.03 and not args.bf16
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.model_max_length == 512 and args.optim == "adamw_torch"


def test_legacy_flags_keep_precision_flags_on_gpu_and_map_group_by_length():
    argv, notes = train.translate_legacy_args(["--bf16", "True", "--tf32=True", "--group_by_length"], has_gpu=True)
    assert argv == ["--bf16", "True", "--tf32=True", "--train_sampling_strategy", "group_by_length"]
    assert train.translate_legacy_args(["--bf16", "False"], has_gpu=False)[1] == []  # nothing to say


def test_loss_picture_title_names_the_scheduler_and_batch():
    argv = [
        "--output_dir",
        "x",
        "--lr_scheduler_type",
        "cosine",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--report_to",
        "none",
    ]
    model_args, _, training_args = transformers.HfArgumentParser(
        (train.ModelArguments, train.DataArguments, train.TrainingArguments)
    ).parse_args_into_dataclasses(args=argv)
    title = train.title_for(model_args, training_args)
    assert ", cosine, bs 4x2x1," in title and "SchedulerType" not in title


def test_jdump_is_atomic(tmp_path):
    path = tmp_path / "out.json"
    utils.jdump({"a": 1}, path)

    class Boom(dict):
        def items(self):
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        utils.jdump(Boom(b=2), path)
    assert utils.jload(path) == {"a": 1}  # the old file survives a crash
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # and no temp file is left behind


def test_download_verifies_sha1_and_rows_and_deletes_bad_files(tmp_path):
    src = tmp_path / "upstream.json"
    src.write_text(json.dumps(make_rows(7)))
    sha1 = utils.git_blob_sha1(src.read_bytes())
    dest = tmp_path / "alpaca_data.json"
    utils.download_alpaca_data(dest, url=src.as_uri(), expected_sha1=sha1, expected_rows=7)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match="expected a list of 8 rows, found 7"):
        utils.download_alpaca_data(dest, url=src.as_uri(), expected_sha1=sha1, expected_rows=8)
    assert not dest.exists()
    with pytest.raises(ValueError, match="SHA-1"):
        utils.download_alpaca_data(dest, url=src.as_uri(), expected_sha1="0" * 40, expected_rows=7)
    assert not dest.exists()
    with pytest.raises(SystemExit, match="offline"):
        utils.download_alpaca_data(dest, url="http://127.0.0.1:9/alpaca_data.json", timeout=5)


def test_git_blob_sha1_matches_git():
    # `printf 'hello\n' | git hash-object --stdin`
    assert utils.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
