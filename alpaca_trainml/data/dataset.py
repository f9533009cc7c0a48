"""Alpaca rows from disk to training examples: load, validate, build the prompts, tokenize and mask.

The labelling is the original's: the prompt is tokenized alone and with the output (both truncated at
model_max_length) and the first len(prompt) labels become IGNORE_INDEX.
"""

import copy
import logging
from typing import Dict, Sequence

import torch
import transformers
from torch.utils.data import Dataset

from alpaca_trainml import jsonio
from alpaca_trainml.data import prompts
from alpaca_trainml.data.collators import DataCollatorForSupervisedDataset
from alpaca_trainml.data.special_tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)


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


MAX_REPORTED_PROBLEMS = 20


def validate_rows(rows, path) -> None:
    """Raise ValueError listing every malformed row (up to a cap): file, row index, field, and what was found."""
    if not isinstance(rows, list):
        raise ValueError(
            f"{path}: expected a JSON list of rows (or .jsonl, one object a line), found {type(rows).__name__}"
        )
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            problems.append(f"row {i}: expected an object with instruction/input/output, found {type(row).__name__}")
            continue
        for key in ("instruction", "output"):
            if key not in row:
                problems.append(f"row {i}: missing field '{key}'")
            elif not isinstance(row[key], str):
                problems.append(f"row {i}: field '{key}' must be a string, found {type(row[key]).__name__}")
            elif not row[key].strip():
                problems.append(f"row {i}: field '{key}' is empty")
        if row.get("input") is not None and not isinstance(row["input"], str):
            problems.append(f"row {i}: field 'input' must be a string, found {type(row['input']).__name__}")
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ValueError(f"{path}: {len(problems)} problem(s) in the data:\n  " + "\n  ".join(shown) + more)


def load_rows(data_path):
    """Read and validate an Alpaca data file; errors name the file."""
    try:
        rows = jsonio.jload(data_path)
    except FileNotFoundError:
        raise ValueError(
            f"{data_path}: no such file (for the original data run `python utils.py download_alpaca_data`)"
        ) from None
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"{data_path}: not valid JSON ({e})") from e
    validate_rows(rows, data_path)
    return rows


def build_example_texts(rows, eos_token):
    """(sources, targets): the Alpaca prompt for each row, and its output followed by EOS."""
    sources = [prompts.format_prompt(r["instruction"], r.get("input")) for r in rows]
    targets = [f"{r['output']}{eos_token}" for r in rows]
    return sources, targets


class SupervisedDataset(Dataset):
    """Dataset for supervised fine-tuning."""

    def __init__(self, data_path: str, tokenizer: transformers.PreTrainedTokenizer, rows=None, by_construction=False):
        super().__init__()
        rows = load_rows(data_path) if rows is None else rows
        logger.info("tokenizing %d rows from %s", len(rows), data_path)
        sources, targets = build_example_texts(rows, tokenizer.eos_token)
        data_dict = (preprocess_by_construction if by_construction else preprocess)(sources, targets, tokenizer)
        self.input_ids = data_dict["input_ids"]
        self.labels = data_dict["labels"]
        n = tokenizer.model_max_length
        self.num_truncated = sum(len(ids) >= n for ids in self.input_ids)
        self.num_fully_masked = sum(bool((lab == IGNORE_INDEX).all()) for lab in self.labels)
        logger.info(
            "%s: %d rows, %d reached model_max_length=%d (truncated), %d have no trainable label",
            data_path,
            len(rows),
            self.num_truncated,
            n,
            self.num_fully_masked,
        )

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i) -> Dict[str, torch.Tensor]:
        return dict(input_ids=self.input_ids[i], labels=self.labels[i])


def split_rows(rows, val_set_size, seed):
    """Seeded shuffle, then hold out val_set_size rows: (train_rows, eval_rows)."""
    if val_set_size >= len(rows):
        raise ValueError(f"--val_set_size {val_set_size} leaves no training rows (the data has {len(rows)})")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[val_set_size:]], [rows[i] for i in order[:val_set_size]]


def load_data(data_args, seed=42):
    """Read and validate the training and eval rows before any model loads: (train_rows, eval_rows or None).

    A bad row in a 52K file is then reported in seconds, not after minutes of loading a 7B model."""
    rows = load_rows(data_args.data_path)
    if getattr(data_args, "val_set_size", 0):
        return split_rows(rows, data_args.val_set_size, seed)
    if getattr(data_args, "eval_data_path", None):
        return rows, load_rows(data_args.eval_data_path)
    return rows, None


def make_supervised_data_module(tokenizer: transformers.PreTrainedTokenizer, data_args, seed=42, rows=None) -> Dict:
    """Make dataset and collator for supervised fine-tuning. rows: load_data's result, if already read."""
    by_construction = getattr(data_args, "mask_source_by_construction", False)
    train_rows, eval_rows = load_data(data_args, seed) if rows is None else rows
    eval_dataset = None
    if eval_rows is not None:
        name = data_args.eval_data_path or f"{data_args.data_path} (held out)"
        eval_dataset = SupervisedDataset(name, tokenizer, eval_rows, by_construction)
    train_dataset = SupervisedDataset(data_args.data_path, tokenizer, train_rows, by_construction)
    if train_dataset.num_fully_masked == len(train_dataset):
        raise ValueError(
            f"{data_args.data_path}: no row has a trainable label; the prompts fill all "
            f"{tokenizer.model_max_length} tokens (raise --model_max_length)"
        )
    data_collator = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    return dict(train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=data_collator)
