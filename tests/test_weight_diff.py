"""weight_diff.py on a 2-layer Llama: round trip, the [PAD] resize, corruption, missing keys, sharded
and .bin input, and the CLI end to end (the recovered folder loads and generates)."""

import hashlib
import json
import logging
import shutil

import pytest
import torch
from helpers import load_all
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import weight_diff as script
from alpaca_trainml.checkpoints import weight_diff
from train import missing_special_tokens, smart_tokenizer_and_embedding_resize

# tiny tensors, so small limits make every path run: the 401x32 fp32 embedding (51 KB) spans 6 chunks
CHUNK_MB, SHARD_MB = 0.01, 0.05  # 10 KiB chunks, 51 KiB shards
FP32_ROUNDING = 1e-6  # (t - r) + r differs from t by at most one fp32 ulp of values below ~4: 4.8e-7


def sha256(tensor):
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def tuned_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama as train.py would fine-tune it: [PAD] added with the mean resize, every weight
    nudged; saved in 30 KB shards so make_diff reads sharded input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    smart_tokenizer_and_embedding_resize(missing_special_tokens(tok), tok, model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("tuned")
    model.save_pretrained(out, max_shard_size="30KB")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def diff_dir(tiny_llama_dir, tuned_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffs") / "diff"
    weight_diff.make_diff(tiny_llama_dir, tuned_dir, out, chunk_mb=CHUNK_MB, max_shard_mb=SHARD_MB)
    return out


@pytest.fixture(scope="module")
def recovered_dir(tiny_llama_dir, diff_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recovered") / "model"
    weight_diff.recover(tiny_llama_dir, diff_dir, out, test_inference=False, chunk_mb=CHUNK_MB, max_shard_mb=SHARD_MB)
    return out


def test_round_trip_gives_tuned_weights_and_exactly_the_manifest(tuned_dir, diff_dir, recovered_dir):
    assert len(list(tuned_dir.glob("*.safetensors"))) > 1  # the input really is sharded
    tuned, recovered = load_all(tuned_dir), load_all(recovered_dir)
    manifest = json.loads((diff_dir / weight_diff.MANIFEST).read_text())["tensors"]
    assert sorted(recovered) == sorted(tuned) == sorted(manifest)
    for key, tensor in recovered.items():
        assert sha256(tensor) == manifest[key]["sha256"], key
        assert torch.allclose(tensor, tuned[key], atol=FP32_ROUNDING, rtol=0), key
    # 400 sentencepiece pieces + the [PAD] row train.py added
    assert recovered["model.embed_tokens.weight"].shape == (401, 32)
    assert json.loads((recovered_dir / "config.json").read_text())["dtype"] == "float32"


def test_output_is_sharded_with_an_index(diff_dir, recovered_dir):
    for folder in (diff_dir, recovered_dir):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) > 1 and all((folder / f).is_file() for f in files)
        assert index["metadata"]["total_size"] == sum(4 * t.numel() for t in load_all(folder).values())
    assert not list(diff_dir.parent.glob(".*partial*"))  # the temp folders were renamed away


def test_diff_equals_the_original_algorithm(tiny_llama_dir, tuned_dir, diff_dir):
    """The original: load both in fp32, [PAD] + mean resize on raw, tuned - raw per state_dict key."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    smart_tokenizer_and_embedding_resize(dict(pad_token="[PAD]"), tok, raw)
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).state_dict()
    ours = load_all(diff_dir)
    for key, r in raw.state_dict().items():
        assert torch.allclose(ours[key], tuned[key] - r, atol=FP32_ROUNDING, rtol=0), key


def test_corrupted_byte_names_the_tensor(tiny_llama_dir, diff_dir, tmp_path):
    bad = tmp_path / "diff"
    shutil.copytree(diff_dir, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    with safe_open(shard, framework="pt") as f:
        victim = sorted(f.keys())[0]
    header_len = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    start = json.loads(shard.read_bytes()[8:header_len])[victim]["data_offsets"][0]
    data = bytearray(shard.read_bytes())
    data[header_len + start + 2] ^= 0x40  # one bit of the first float's third byte
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{victim}: sha256 of the recovered tensor"):
        weight_diff.recover(tiny_llama_dir, bad, tmp_path / "out", test_inference=False)
    assert not (tmp_path / "out").exists()


def test_missing_key_is_named(tiny_llama_dir, diff_dir, tmp_path):
    bad = tmp_path / "diff"
    shutil.copytree(diff_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = bad / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{victim}: only in the raw model"):
        weight_diff.recover(tiny_llama_dir, bad, tmp_path / "out", test_inference=False)


def test_shape_mismatch_and_extra_key_reported_together():
    with pytest.raises(ValueError) as e:
        weight_diff.pair_up({"a": (3, 2), "b": (4,)}, {"a": (3, 5), "b": (4,), "c": (1,)}, {}, {"a", "b", "c"}, "D")
    assert "a: shape [3, 5] in D, the raw model gives [3, 2]" in str(e.value)
    assert "c: only in D" in str(e.value)


def test_bin_input_gives_the_same_manifest(tiny_llama_dir, tuned_dir, diff_dir, tmp_path):
    raw_bin = tmp_path / "raw_bin"
    shutil.copytree(tiny_llama_dir, raw_bin)
    torch.save(load_file(raw_bin / "model.safetensors"), raw_bin / "pytorch_model.bin")
    (raw_bin / "model.safetensors").unlink()
    weight_diff.make_diff(raw_bin, tuned_dir, tmp_path / "diff", chunk_mb=CHUNK_MB)

    def manifest(d):
        return json.loads((d / weight_diff.MANIFEST).read_text())["tensors"]

    assert manifest(tmp_path / "diff") == manifest(diff_dir)


def test_refuses_to_overwrite_an_input_or_a_full_folder(tiny_llama_dir, diff_dir, tmp_path):
    with pytest.raises(ValueError, match="is one of the input folders"):
        weight_diff.recover(tiny_llama_dir, diff_dir, tiny_llama_dir, test_inference=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        weight_diff.make_diff(tiny_llama_dir, diff_dir, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_without_path_tuned_nothing_is_left_behind(tiny_llama_dir, diff_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(weight_diff.tempfile, "tempdir", str(tmp_path))  # where the temp result goes
    assert weight_diff.recover(tiny_llama_dir, diff_dir, test_inference=False, chunk_mb=CHUNK_MB) is None
    assert list(tmp_path.iterdir()) == []


def test_naive_check_only_for_alpaca_7b(tmp_path, diff_dir, caplog):
    (tmp_path / "config.json").write_text(
        json.dumps(dict(weight_diff.ALPACA_7B_CONFIG, architectures=["LlamaForCausalLM"]))
    )
    assert weight_diff.naive_check_applies(tmp_path)
    with caplog.at_level(logging.INFO, logger="alpaca_trainml.checkpoints.weight_diff"):
        assert not weight_diff.naive_check_applies(diff_dir)
    assert "not the Alpaca-7B diff" in caplog.text
    # fp32 sums added in state_dict order, keys outside it last
    total = weight_diff.naive_sum({"b": torch.tensor(2.0), "a": torch.tensor(0.5)}, ["b", "a"])
    assert total.dtype == torch.float32 and total.item() == 2.5


def test_cli_round_trip_loads_and_generates(tiny_llama_dir, tuned_dir, tmp_path, capsys, caplog):
    """The fire CLI of `python weight_diff.py make_diff|recover ...`, run in this process (a fresh one imports torch
    again: minutes on a busy 2-core machine)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script.main(
        [
            "make_diff",
            "--path_raw",
            str(tiny_llama_dir),
            "--path_tuned",
            str(tuned_dir),
            "--path_diff",
            str(tmp_path / "d"),
        ]
    )
    with caplog.at_level(logging.INFO, logger="alpaca_trainml.checkpoints.weight_diff"):
        script.main(
            [
                "recover",
                "--path_raw",
                str(tiny_llama_dir),
                "--path_diff",
                str(tmp_path / "d"),
                "--path_tuned",
                str(tmp_path / "t"),
                "--test_inference",
                "True",
                "--inference_max_length",
                "80",
            ]
        )
    assert (
        "Completion:" in capsys.readouterr().out and "skipped, " in caplog.text
    )  # sampled text; the naive check explained

    tok = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert tok.pad_token == "[PAD]"  # the tuned tokenizer travelled with the diff
    enc = tok("### Instruction:\nCount the words.", return_tensors="pt")
    outs = [
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).generate(
            **enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id
        )
        for d in (tmp_path / "t", tuned_dir)
    ]
    assert outs[0].shape[1] > enc["input_ids"].shape[1] and torch.equal(outs[0], outs[1])


def test_unknown_task_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["bogus"])
    assert exc.value.code == 2  # cli.USAGE_EXIT, as argparse
    err = capsys.readouterr().err.strip()
    assert err == "weight_diff.py: error: unknown command 'bogus'; expected one of: make_diff, recover, merge_lora"


def test_a_missing_raw_folder_is_one_line_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["recover", "--path_raw", str(tmp_path / "nope"), "--path_diff", str(tmp_path / "d")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"weight_diff.py: error: {tmp_path / 'nope'}: no such folder"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_diff_and_recovered_folders_get_the_umask_modes(tiny_llama_dir, tuned_dir, tmp_path, mask):
    from helpers import expected_modes, modes, umask

    with umask(mask):
        weight_diff.make_diff(tiny_llama_dir, tuned_dir, tmp_path / "diff", chunk_mb=CHUNK_MB, max_shard_mb=SHARD_MB)
        weight_diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "tuned", test_inference=False)
    found = modes(tmp_path / "diff", tmp_path / "tuned")
    assert str(tmp_path / "diff" / weight_diff.MANIFEST) in found and str(tmp_path / "tuned" / "config.json") in found
    assert found == expected_modes(found, mask)  # 022: files 0644, folders 0755 (another account can read them)


def test_diffing_an_adapter_folder_says_to_merge_it_first(tiny_llama_dir, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="a LoRA adapter, not a whole model; merge it into its base first") as e:
        weight_diff.make_diff(tiny_llama_dir, tmp_path / "adapter", tmp_path / "diff")
    assert "python weight_diff.py merge_lora" in str(e.value) and not (tmp_path / "diff").exists()
