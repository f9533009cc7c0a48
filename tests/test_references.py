"""evaluation/references.py: the held-out loss equals transformers' own loss on each example, and ROUGE-L is
rouge_score's F-measure."""

import json
import math

import pytest
import torch
import transformers
from helpers import make_rows

from alpaca_trainml.data.dataset import SupervisedDataset
from alpaca_trainml.evaluation import references


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence():
    scores = references.rouge_l(["the cat sat", "a b c d"], ["the cat sat", "a x c y"])
    # 2nd: LCS "a c" = 2 tokens of 4 each side: precision = recall = 0.5, F = 0.5
    assert scores == [1.0, 0.5]
    assert references.mean(scores) == 0.75 and math.isnan(references.mean([]))


def test_heldout_loss_is_the_token_mean_of_transformers_loss(tiny_llama_dir, tmp_path):
    rows = make_rows(3, seed=5)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(rows))
    ours = references.heldout_loss(tiny_llama_dir, path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir, model_max_length=512)
    tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    data = SupervisedDataset(str(path), tokenizer, rows)
    total = count = 0
    with torch.no_grad():
        for ids, labels in zip(data.input_ids, data.labels):
            n = int((labels[1:] != -100).sum())  # transformers averages over the shifted supervised positions
            total += model(input_ids=ids[None], labels=labels[None]).loss.item() * n
            count += n
    assert ours == pytest.approx(total / count, rel=1e-5) and 0 < ours < 10  # ln(400) = 6.0 for a random model
