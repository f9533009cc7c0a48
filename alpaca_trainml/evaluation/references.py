"""Scores against the eval set's own references, no judge needed: the held-out loss (mean cross-entropy per answer
token, in nats) and the ROUGE-L F-measure of each answer against the reference output."""

import math

import torch
from rouge_score import rouge_scorer

from alpaca_trainml import models
from alpaca_trainml.data.dataset import SupervisedDataset
from alpaca_trainml.data.special_tokens import IGNORE_INDEX


def heldout_loss(model_name_or_path, eval_set, max_rows=None, model_max_length=512):
    """Mean cross-entropy per supervised token (nats) of a checkpoint on Alpaca rows or chats, in its prompt style.

    Each example runs alone (no padding), so the number does not depend on a batch size."""
    import transformers

    from alpaca_trainml.data.dataset import load_rows

    rows = load_rows(str(eval_set))[:max_rows]
    tokenizer = models.from_pretrained(
        transformers.AutoTokenizer, model_name_or_path, model_max_length=model_max_length, padding_side="right"
    )
    if tokenizer.pad_token is None:  # a base model's tokenizer: examples run one at a time, so pad is never fed
        tokenizer.pad_token = tokenizer.eos_token
    model = models.from_pretrained(transformers.AutoModelForCausalLM, model_name_or_path, dtype=torch.float32)
    model.eval()
    data = SupervisedDataset(str(eval_set), tokenizer, rows)
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, labels in zip(data.input_ids, data.labels):
            logits = model(input_ids=ids[None]).logits[0, :-1].float()  # (seq-1, vocab) predicting tokens 1..seq-1
            target = labels[1:]
            mask = target != IGNORE_INDEX
            if mask.any():
                total += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
                count += int(mask.sum())
    return total / count if count else math.nan


def rouge_l(answers, references):
    """ROUGE-L F-measure (rouge_score's, no stemming) of each answer against its reference, in order."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]


def mean(values):
    return sum(values) / len(values) if values else math.nan
