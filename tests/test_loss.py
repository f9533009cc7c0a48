"""training/loss.py: the loss over supervised positions only equals the model's own loss, with the same gradients."""

import pytest
import torch
import transformers

from alpaca_trainml.data.collators import DataCollatorForSupervisedDataset, DataCollatorPaddingFree
from alpaca_trainml.training import loss


class PadZero:
    pad_token_id = 0


def tiny(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config)


def examples():
    """Three examples of 7, 5 and 9 tokens whose first 3, 2 and 4 tokens are the prompt (-100)."""
    out = []
    for n, prompt in [(7, 3), (5, 2), (9, 4)]:
        ids = torch.randint(1, 300, (n,))
        labels = ids.clone()
        labels[:prompt] = -100
        out.append(dict(input_ids=ids, labels=labels))
    return out


@pytest.mark.parametrize(
    "collate", [DataCollatorForSupervisedDataset(PadZero()), DataCollatorPaddingFree(PadZero(), max_row_tokens=12)]
)
def test_supervised_loss_equals_the_models_loss_and_gradients(collate):
    model = tiny()
    batch = collate(examples())
    model(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    reference = model(**batch).loss.item()
    model.zero_grad()
    got = loss.supervised_loss(model, batch)
    got.backward()
    assert got.item() == pytest.approx(reference, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # with the Trainer's divisor (supervised tokens over all accumulated micro-batches), the sum is divided by it
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert loss.supervised_loss(model, batch, num_items_in_batch=2 * n).item() == pytest.approx(reference / 2, rel=1e-6)


def test_applies_only_to_plain_models_with_a_plain_head():
    model = tiny()
    assert loss.applies(model)
    assert not loss.applies(
        torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    )
    gemma = transformers.Gemma2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    assert not loss.applies(transformers.Gemma2ForCausalLM(gemma))  # soft-capped logits: the model's own loss
