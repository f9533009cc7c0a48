"""Tests of utils.py: the prompt templates, atomic JSON, the verified download, model paths."""

import json

import pytest
from helpers import make_rows

import utils
from alpaca_trainml.cli import UsageError


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
    with pytest.raises(UsageError, match="offline"):
        utils.download_alpaca_data(dest, url="http://127.0.0.1:9/alpaca_data.json", timeout=5)


def test_git_blob_sha1_matches_git():
    # `printf 'hello\n' | git hash-object --stdin`
    assert utils.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_model_paths_that_name_no_folder_are_refused_with_the_path(tmp_path):
    assert utils.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert utils.resolve_model_path("gpt2") == "gpt2"  # hub ids pass through: "name" or "owner/name"
    assert utils.resolve_model_path("owner/name") == "owner/name"
    for missing in ("./out/no-such-run", str(tmp_path / "gone"), "a/b/c", "~/nothing-here-at-all"):
        # then, where it helps: the closest folder beside it, or that its parent is missing too
        with pytest.raises(ValueError, match=f"^{missing}: no such folder"):
            utils.resolve_model_path(missing)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file; give the model folder"):
        utils.resolve_model_path(str(tmp_path / "config.json"))


def test_from_pretrained_names_the_model_when_the_loader_cannot_find_it():
    class Loader:
        @staticmethod
        def from_pretrained(path, **kwargs):
            raise OSError("owner/name is not a local folder and is not a valid model identifier\nmore detail")

    with pytest.raises(ValueError, match=r"^owner/name: no such folder here, and not a model the hub could serve \("):
        utils.from_pretrained(Loader, "owner/name")
