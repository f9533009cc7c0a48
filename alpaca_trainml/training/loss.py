"""The training loss over the supervised positions only.

A causal LM's forward turns every position into logits over the whole vocabulary (49,152 for SmolLM2) and the loss
then ignores the prompt and padding positions. Alpaca trains on the response only, so about half of those logits,
their softmax and their backward are thrown away. Here the decoder runs as usual and the LM head and the
cross-entropy run on the positions that have a label: the same loss (sum over supervised tokens / their number, as
transformers' ForCausalLMLoss), the same gradients, less time and far less memory (no (rows, length, vocab) tensor).
"""

import torch
import torch.nn.functional as F

from alpaca_trainml.data.special_tokens import IGNORE_INDEX

# Causal LMs whose logits are exactly lm_head(last hidden state): no logit scaling or soft-capping to repeat here.
PLAIN_HEAD_MODELS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def applies(model):
    """True for a plain (not DDP/FSDP/DeepSpeed-wrapped) model of a kind whose logits are lm_head(hidden)."""
    return isinstance(model, torch.nn.Module) and type(base_of(model)).__name__ in PLAIN_HEAD_MODELS


def supervised_loss(model, inputs, num_items_in_batch=None):
    """Mean cross-entropy of the next token at every position with a label (labels: (rows, length), -100 = not
    trained). num_items_in_batch: the divisor across gradient accumulation, as the Trainer passes it."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    base = base_of(model)
    hidden = base.get_decoder()(**inputs).last_hidden_state  # (rows, length, hidden)
    target = labels[:, 1:]  # position t predicts token t + 1
    keep = target != IGNORE_INDEX  # (rows, length - 1)
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (supervised tokens, vocab)
    loss = F.cross_entropy(logits, target[keep], reduction="sum")
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(divisor):
        divisor = divisor.to(loss.device)
    return loss / divisor
