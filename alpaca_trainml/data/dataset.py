"""Training data from disk to examples: load and validate (formats.py), turn every row into messages, then let the
tokenizer's prompt style (prompts.py) build the prompts, tokenize and mask. The Alpaca style keeps the original's
labelling for Alpaca rows (alpaca_labels.py); chats go through conversations.py.
"""

import logging
from typing import Dict

import torch
import transformers
from torch.utils.data import Dataset

from alpaca_trainml import jsonio
from alpaca_trainml.data import conversations, formats, prompts
from alpaca_trainml.data.collators import DataCollatorForSupervisedDataset
from alpaca_trainml.data.special_tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)


MAX_REPORTED_PROBLEMS = 20


def problem_report(path, problems):
    """One line per problem (the first MAX_REPORTED_PROBLEMS), under a line naming the file and the count."""
    shown = problems[:MAX_REPORTED_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"{path}: {len(problems)} problem(s) in the data:\n  " + "\n  ".join(shown) + more


def validate_rows(rows, path):
    """The file's shape (formats.py); ValueError listing every malformed row (up to a cap): file, row, field, and
    what was found."""
    if not isinstance(rows, list):
        raise ValueError(
            f"{path}: expected a JSON list of rows (or .jsonl, one object a line), found {type(rows).__name__}"
        )
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    shape, problems = formats.row_problems(rows, path)
    if problems:
        raise ValueError(problem_report(path, problems))
    return shape


def read_file(path):
    try:
        return jsonio.jload(path)
    except FileNotFoundError:
        raise ValueError(
            f"{path}: no such file (for the original data run `python utils.py download_alpaca_data`)"
        ) from None
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_rows(data_path):
    """Read and validate data files (comma-separated paths are joined in order): Alpaca rows as they are, chat rows
    as {"messages": [...]} (formats.to_messages). Errors name the file; every bad file is reported."""
    rows, errors = [], []
    for path in [p.strip() for p in str(data_path).split(",") if p.strip()]:
        try:
            file_rows = read_file(path)
            shape = validate_rows(file_rows, path)
        except ValueError as e:
            errors.append(str(e))
            continue
        rows += file_rows if shape == formats.ALPACA else [{"messages": formats.to_messages(r)} for r in file_rows]
    if errors:
        raise ValueError("\n".join(errors))
    if not rows:
        raise ValueError(f"--data_path {data_path!r} names no file")
    return rows


def row_messages(row):
    """A row as messages: a chat row's own, or an Alpaca row as a user turn carrying its input, then the answer."""
    if "messages" in row:
        return row["messages"]
    user = {"role": "user", "content": row["instruction"], "input": row.get("input") or ""}
    return [user, {"role": "assistant", "content": row["output"]}]


class SupervisedDataset(Dataset):
    """Dataset for supervised fine-tuning: Alpaca rows and chats, as messages in the tokenizer's prompt style.

    example_rows[i]: the row example i came from."""

    def __init__(self, data_path: str, tokenizer: transformers.PreTrainedTokenizer, rows=None, by_construction=False):
        super().__init__()
        rows = load_rows(data_path) if rows is None else rows
        style = prompts.load_style(tokenizer)
        logger.info("tokenizing %d rows from %s (prompt style %s)", len(rows), data_path, style.name)
        self.chat_stats = conversations.ChatStats()
        per_row = style.encode(tokenizer, [row_messages(r) for r in rows], self.chat_stats, by_construction)
        self.example_rows = [i for i, examples in enumerate(per_row) for _ in examples]
        self.input_ids = [ids for examples in per_row for ids, _ in examples]
        self.labels = [labels for examples in per_row for _, labels in examples]
        n = tokenizer.model_max_length
        plain = len(rows) - self.chat_stats.conversations  # rows the style labelled as the original did
        self.num_truncated = sum(len(ids) >= n for ids in self.input_ids)  # examples cut at model_max_length
        self.num_fully_masked = sum(bool((lab == IGNORE_INDEX).all()) for lab in self.labels)
        if plain:
            logger.info(
                "%s: %d Alpaca rows, %d reached model_max_length=%d (truncated), %d have no trainable label",
                data_path,
                plain,
                self.num_truncated,
                n,
                self.num_fully_masked,
            )
        if self.chat_stats.conversations:
            conversations.log_stats(data_path, self.chat_stats, n)

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
