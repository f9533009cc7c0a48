"""The original Alpaca labelling of instruction rows, which the Alpaca prompt style keeps (prompts.Alpaca.encode):
the prompt is tokenized alone and with the output (both truncated at model_max_length) and the first len(prompt)
labels become IGNORE_INDEX. train.py exports these under the seed's names."""

import copy
from typing import Dict, Sequence

import torch
import transformers

from alpaca_trainml.data.special_tokens import IGNORE_INDEX
from alpaca_trainml.data.templates import format_prompt


def _tokenize_fn(strings: Sequence[str], tokenizer: transformers.PreTrainedTokenizer) -> Dict:
    """Tokenize each string, truncated at model_max_length. Lengths count non-pad tokens, as the original did."""
    input_ids = [
        torch.tensor(ids, dtype=torch.long)
        for ids in tokenizer(list(strings), max_length=tokenizer.model_max_length, truncation=True)["input_ids"]
    ]
    lens = [int(ids.ne(tokenizer.pad_token_id).sum()) for ids in input_ids]
    return dict(input_ids=input_ids, labels=input_ids, input_ids_lens=lens, labels_lens=lens)


def preprocess(sources: Sequence[str], targets: Sequence[str], tokenizer: transformers.PreTrainedTokenizer) -> Dict:
    """The original labelling: tokenize source+target and source apart, then mask len(source) tokens."""
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized, sources_tokenized = [_tokenize_fn(strings, tokenizer) for strings in (examples, sources)]
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        label[:source_len] = IGNORE_INDEX
    return dict(input_ids=input_ids, labels=labels)


def preprocess_by_construction(sources, targets, tokenizer) -> Dict:
    """Opt-in labelling: ids = tokenize(source) + tokenize(target, no specials), so the mask is exact."""
    src = tokenizer(list(sources))["input_ids"]
    tgt = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    n = tokenizer.model_max_length
    input_ids = [torch.tensor((s + t)[:n], dtype=torch.long) for s, t in zip(src, tgt)]
    labels = [torch.tensor(([IGNORE_INDEX] * len(s) + t)[:n], dtype=torch.long) for s, t in zip(src, tgt)]
    return dict(input_ids=input_ids, labels=labels)


def build_example_texts(rows, eos_token):
    """(sources, targets): the Alpaca prompt for each Alpaca row, and its output followed by EOS."""
    sources = [format_prompt(r["instruction"], r.get("input")) for r in rows]
    targets = [f"{r['output']}{eos_token}" for r in rows]
    return sources, targets
