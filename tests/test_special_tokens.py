"""Tests of special_tokens.py: the tokens added, the resize, the mean rows, in memory and streamed from disk."""

import torch
import transformers
from helpers import build_tiny_llama, load_all

from alpaca_trainml.checkpoints import checkpoint_io
from alpaca_trainml.data import special_tokens


def test_missing_special_tokens_are_added_with_mean_rows(bpe_tokenizer_dir, tmp_path, monkeypatch):
    from helpers import build_tiny_llama

    model_dir = build_tiny_llama(bpe_tokenizer_dir, tmp_path / "m")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    missing = special_tokens.missing_special_tokens(tokenizer)
    assert missing == {"pad_token": "[PAD]", "bos_token": "<s>", "unk_token": "<unk>"}  # the BPE fixture has only EOS
    special_tokens.smart_tokenizer_and_embedding_resize(missing, tokenizer, model)
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == old_in.shape[0] + 3 == len(tokenizer)
    torch.testing.assert_close(new_in[:-3], old_in)
    for row in range(-3, 0):
        torch.testing.assert_close(new_in[row], old_in.mean(0))
        torch.testing.assert_close(new_out[row], old_out.mean(0))
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == len(tokenizer) - 3
    # the configs hold the new ids, so the Trainer has nothing to align (it would warn "The tokenizer has new
    # PAD/BOS/EOS tokens that differ from the model config" in every run)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    from transformers import trainer_utils

    warned = []
    monkeypatch.setattr(trainer_utils.logger, "warning", warned.append)
    trainer_utils.align_special_tokens(model, tokenizer)  # what the Trainer runs at its start
    assert warned == []


def test_align_token_ids_keeps_the_other_stop_ids_of_a_list():
    from types import SimpleNamespace

    config = SimpleNamespace(pad_token_id=None, bos_token_id=1, eos_token_id=[7, 8])
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: config), generation_config=None)
    special_tokens.align_token_ids(SimpleNamespace(pad_token_id=9, bos_token_id=1, eos_token_id=2), model)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (9, 1, [2, 7, 8])


def test_pad_resize_adds_what_train_py_adds(tiny_llama_dir, bpe_tokenizer_dir, tmp_path):
    """sentencepiece has <unk>, <s>, </s>: only [PAD] is added, as in the original. The GPT-2-like BPE
    tokenizer lacks pad, bos and unk: 3 rows, as train.py's missing_special_tokens adds."""
    from transformers import AutoTokenizer

    keys = {"model.embed_tokens.weight", "lm_head.weight"}
    spm = special_tokens.embedding_resize(tiny_llama_dir, checkpoint_io.meta_model(tiny_llama_dir), keys)
    assert spm == {k: (400, 1) for k in keys}
    bpe_model = build_tiny_llama(bpe_tokenizer_dir, tmp_path / "bpe")
    n = len(AutoTokenizer.from_pretrained(bpe_tokenizer_dir))
    assert special_tokens.embedding_resize(bpe_model, checkpoint_io.meta_model(bpe_model), keys) == {
        k: (n, 3) for k in keys
    }


def test_raw_rows_past_the_table_are_its_mean(tiny_llama_dir):
    raw = checkpoint_io.Checkpoint(tiny_llama_dir)
    key, table = "model.embed_tokens.weight", load_all(tiny_llama_dir)["model.embed_tokens.weight"]
    means = {key: special_tokens.mean_row(raw, key, 400)}
    rows = special_tokens.raw_rows(raw, key, 398, 401, {key: (400, 1)}, means)
    assert torch.equal(rows[:2], table[398:400])
    assert torch.allclose(rows[2], table.mean(0), atol=1e-7, rtol=0)  # fp64 vs fp32 summation of 400 rows
