"""checkpoints/lora_merge.py: reading a saved adapter, checking it against the base's shapes, and the merge arithmetic,
on adapter files written here by hand (two tensors and a token row): no model is built. The whole merge of a
trained adapter runs in test_lora.py."""

import json

import pytest
import torch
from safetensors.torch import save_file

from alpaca_trainml.checkpoints import lora_merge
from alpaca_trainml.cli import UsageError

Q = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


def write_adapter(folder, config=None, tensors=None):
    """An adapter folder as peft saves one: r=2, lora_alpha=4 (scaling 2), q_proj of a (3, 4) base tensor, and the
    trained row of token 5 of the (8, 4) embeddings."""
    folder.mkdir(exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "trainable_token_indices": [5]}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    prefix = lora_merge.PREFIX
    default = {
        f"{prefix}model.layers.0.self_attn.q_proj.lora_A.weight": torch.arange(8.0).reshape(2, 4),
        f"{prefix}model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(3, 2),
        f"{prefix}model.embed_tokens.token_adapter.trainable_tokens_delta": torch.full((1, 4), 7.0),
    }
    save_file(tensors if tensors is not None else default, folder / "adapter_model.safetensors")
    return folder


def test_the_adapter_is_read_by_the_base_tensor_each_part_changes(tmp_path):
    adapter = lora_merge.Adapter(write_adapter(tmp_path / "a"))
    assert adapter.scaling == 2  # lora_alpha / r
    assert adapter.keys() == {Q, EMBED} and adapter.lora[Q][0].shape == (2, 4) and adapter.lora[Q][1].shape == (3, 2)
    ids, rows = adapter.tokens[EMBED]
    assert ids.tolist() == [5] and rows.tolist() == [[7.0] * 4]
    rslora = lora_merge.Adapter(write_adapter(tmp_path / "b", {"use_rslora": True}))
    assert rslora.scaling == pytest.approx(4 / 2**0.5)  # rsLoRA: lora_alpha / sqrt(r)


def test_merged_rows_add_b_at_a_times_scaling_and_put_the_trained_token_rows(tmp_path):
    adapter = lora_merge.Adapter(write_adapter(tmp_path / "a"))
    a, b = adapter.lora[Q]
    merged = lora_merge.merged_rows(adapter, Q, 0, 3, torch.ones(3, 4))
    assert torch.equal(merged, torch.ones(3, 4) + (b @ a) * 2)
    # rows 4..7 of the embeddings: only token 5 (row 1 of this chunk) is replaced
    table = lora_merge.merged_rows(adapter, EMBED, 4, 8, torch.zeros(4, 4))
    assert table.tolist() == [[0.0] * 4, [7.0] * 4, [0.0] * 4, [0.0] * 4]


def test_check_pairs_names_every_tensor_that_does_not_fit_the_base(tmp_path):
    adapter = lora_merge.Adapter(write_adapter(tmp_path / "a"))
    lora_merge.check_pairs(adapter, {Q: (3, 4), EMBED: (8, 4)}, "base")  # fits
    with pytest.raises(UsageError) as e:
        lora_merge.check_pairs(adapter, {Q: (3, 5), EMBED: (5, 4)}, "other-base")
    msg = str(e.value)
    assert "the adapter does not fit the base other-base" in msg
    assert f"{Q}: B @ A is [3, 4], the base tensor is [3, 5]" in msg and f"{EMBED}: token rows [5]" in msg


def test_what_merge_lora_cannot_merge_is_refused_with_the_file_named(tmp_path):
    with pytest.raises(UsageError, match="merge_lora does not handle use_dora"):
        lora_merge.Adapter(write_adapter(tmp_path / "dora", {"use_dora": True}))
    folder = write_adapter(tmp_path / "odd", tensors={"model.x.weight": torch.zeros(1)})
    with pytest.raises(UsageError, match="model.x.weight: not a peft tensor name"):
        lora_merge.Adapter(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UsageError, match="no adapter_model.safetensors"):
        lora_merge.Adapter(folder)
