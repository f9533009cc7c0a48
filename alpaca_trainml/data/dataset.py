"""Training data from disk to examples: load, validate (formats.py), build the prompts, tokenize and mask.

Alpaca rows in the Alpaca style keep the original's labelling: the prompt is tokenized alone and with the output
(both truncated at model_max_length) and the first len(prompt) labels become IGNORE_INDEX. Chats (and, in a model's
own chat template style, Alpaca rows too) go through conversations.py.
"""

import copy
import logging
from typing import Dict, Sequence

import torch
import transformers
from torch.utils.data import Dataset

from alpaca_trainml import jsonio
from alpaca_trainml.data import conversations, formats, prompts
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


def build_example_texts(rows, eos_token):
    """(sources, targets): the Alpaca prompt for each row, and its output followed by EOS."""
    sources = [prompts.format_prompt(r["instruction"], r.get("input")) for r in rows]
    targets = [f"{r['output']}{eos_token}" for r in rows]
    return sources, targets


def row_messages(row):
    """A row as a chat: a chat row's messages, or an Alpaca row as one user turn and the answer."""
    if "messages" in row:
        return row["messages"]
    return prompts.instruction_messages(row["instruction"], row.get("input")) + [
        {"role": "assistant", "content": row["output"]}
    ]


class SupervisedDataset(Dataset):
    """Dataset for supervised fine-tuning: Alpaca rows and chats, in the tokenizer's prompt style (prompts.py).

    In the Alpaca style Alpaca rows are labelled as the original did, chats through the Alpaca chat template; in the
    model style every row is a chat through the model's own template. example_rows[i]: the row example i came from."""

    def __init__(self, data_path: str, tokenizer: transformers.PreTrainedTokenizer, rows=None, by_construction=False):
        super().__init__()
        rows = load_rows(data_path) if rows is None else rows
        alpaca_style = prompts.load_style(tokenizer).name == prompts.ALPACA.name
        logger.info("tokenizing %d rows from %s", len(rows), data_path)
        per_row = [[] for _ in rows]
        plain = [i for i, r in enumerate(rows) if alpaca_style and "messages" not in r]
        if plain:
            sources, targets = build_example_texts([rows[i] for i in plain], tokenizer.eos_token)
            data_dict = (preprocess_by_construction if by_construction else preprocess)(sources, targets, tokenizer)
            for i, ids, labels in zip(plain, data_dict["input_ids"], data_dict["labels"]):
                per_row[i].append((ids, labels))
        self.chat_stats = conversations.ChatStats()
        for i in sorted(set(range(len(rows))) - set(plain)):
            per_row[i] = conversations.encode_conversation(
                tokenizer, row_messages(rows[i]), alpaca_style, self.chat_stats
            )
        self.example_rows = [i for i, examples in enumerate(per_row) for _ in examples]
        self.input_ids = [ids for examples in per_row for ids, _ in examples]
        self.labels = [labels for examples in per_row for _, labels in examples]
        n = tokenizer.model_max_length
        self.num_truncated = sum(len(per_row[i][0][0]) >= n for i in plain)
        self.num_fully_masked = sum(bool((lab == IGNORE_INDEX).all()) for lab in self.labels)
        if plain:
            logger.info(
                "%s: %d Alpaca rows, %d reached model_max_length=%d (truncated), %d have no trainable label",
                data_path,
                len(plain),
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
