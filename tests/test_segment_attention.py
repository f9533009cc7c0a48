"""training/segment_attention.py: one row per micro-batch, attention within each example, the padded path's numbers."""

import pytest
import torch
from test_collators import LENGTHS, Tok, micro_batch, tiny_llama

from alpaca_trainml.data import collators
from alpaca_trainml.training import loss as sft_loss
from alpaca_trainml.training import segment_attention


def test_segments_lay_the_micro_batch_in_one_row_and_attend_within_each_example():
    model = tiny_llama("sdpa")
    examples = micro_batch()
    masked = collators.make_collator(Tok(), model.config, 64)(examples)
    assert segment_attention.use_segments(model)
    batch = collators.make_collator(Tok(), model.config, 64)(examples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch  # no padding at all
    assert batch["segment_lengths"] == tuple(LENGTHS)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    assert batch["position_ids"][0, starts].tolist() == [0] * len(LENGTHS)
    assert (batch["labels"][0, starts] == -100).all()
    assert torch.equal(batch["input_ids"][0], torch.cat([x["input_ids"] for x in examples]))
    # train.py's own loss (LM head on supervised positions only) over both layouts; the same number
    with torch.no_grad():
        got = sft_loss.supervised_loss(model, batch)
        segment_attention.restore_sdpa(model)
        want = sft_loss.supervised_loss(model, masked)
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    # without the lengths the same row is one long example: a different loss (the bar the segments meet)
    assert segment_attention.use_segments(model)
    with torch.no_grad():
        leaky = sft_loss.supervised_loss(model, {k: v for k, v in batch.items() if k != "segment_lengths"})
        assert not torch.allclose(leaky, want, rtol=1e-5)
        with pytest.raises(ValueError, match="do not cover"):
            sft_loss.supervised_loss(model, {**batch, "segment_lengths": (3, 4)})


def test_segments_leave_eager_and_flash_models_alone():
    model = tiny_llama("eager")
    assert not segment_attention.use_segments(model)
    assert model.config._attn_implementation == "eager"
