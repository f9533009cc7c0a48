"""Collators: the original's padded micro-batches, and the padding-free layout train.py uses by default."""

import itertools
from dataclasses import dataclass
from typing import Dict, Sequence

import torch
import transformers

from alpaca_trainml.data.special_tokens import IGNORE_INDEX

# The attention implementation that training/segment_attention.py registers with transformers, and the forward
# keyword that carries each example's length in a one-row micro-batch. Here, below training/, so that data/ needs
# nothing above it.
SEGMENTS = "alpaca_segments"
SEGMENT_KWARG = "segment_lengths"


@dataclass
class DataCollatorForSupervisedDataset:
    """Collate examples for supervised fine-tuning: pad each micro-batch to its longest row."""

    tokenizer: transformers.PreTrainedTokenizer

    def __call__(self, instances: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        input_ids, labels = tuple([instance[key] for instance in instances] for key in ("input_ids", "labels"))
        input_ids = torch.nn.utils.rnn.pad_sequence(
            input_ids, batch_first=True, padding_value=self.tokenizer.pad_token_id
        )
        labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        return dict(input_ids=input_ids, labels=labels, attention_mask=input_ids.ne(self.tokenizer.pad_token_id))


def pack_rows(lengths, max_row_tokens):
    """Spread example indices over rows of at most max_row_tokens tokens. Every row is padded to the longest, so the
    cost is rows x longest row: longest first, try the fewest rows that fit with each example going to the emptiest row
    (even sums) and to the fullest row it fits in (tight rows, room left for the rest); keep the cheaper layout."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    fewest = max(1, -(-sum(lengths) // max_row_tokens))
    layouts = [
        next(
            rows
            for n_rows in itertools.count(fewest)
            if (rows := _fill_rows(order, lengths, n_rows, max_row_tokens, even))
        )
        for even in (True, False)
    ]
    return min(layouts, key=lambda rows: len(rows) * max(sum(lengths[i] for i in row) for row in rows))


def _fill_rows(order, lengths, n_rows, max_row_tokens, even):
    """Place examples in order into n_rows rows (the emptiest or the fullest that fits): rows, or None if one fits
    nowhere."""
    rows, sums = [[] for _ in range(n_rows)], [0] * n_rows
    for i in order:
        fits = [r for r in range(n_rows) if sums[r] + lengths[i] <= max_row_tokens]
        if not fits:
            return None
        r = (min if even else max)(fits, key=sums.__getitem__)
        rows[r].append(i)
        sums[r] += lengths[i]
    return [sorted(row) for row in rows if row]


@dataclass
class DataCollatorPaddingFree:
    """The same micro-batch as DataCollatorForSupervisedDataset, laid end to end with no padding between examples.

    Examples are packed into rows of at most max_row_tokens (one long row would make attention cost more than the
    padding saved). Positions restart at each example and each example's first label is IGNORE_INDEX, so the
    loss is the mean over the same trained tokens. attention: "mask" builds an exact block-diagonal causal mask
    (bool for sdpa, additive float for eager); "position_ids" leaves isolation to flash-attention's varlen path;
    "segments" lays the whole micro-batch in one row with no padding at all and passes the examples' lengths, for a
    model switched to training/segment_attention.py's attention (train.py's default under sdpa).

    Example: three examples of 3, 2 and 3 tokens with max_row_tokens=5 (pad id 0; -100 = not trained):

        >>> batch = DataCollatorPaddingFree(tokenizer, max_row_tokens=5)([
        ...     dict(input_ids=torch.tensor([5, 6, 7]), labels=torch.tensor([-100, 6, 7])),
        ...     dict(input_ids=torch.tensor([8, 9]), labels=torch.tensor([-100, 9])),
        ...     dict(input_ids=torch.tensor([3, 4, 2]), labels=torch.tensor([-100, -100, 2]))])
        >>> batch["input_ids"].tolist()     # two rows instead of three rows of 3
        [[5, 6, 7, 8, 9], [3, 4, 2, 0, 0]]
        >>> batch["labels"].tolist()        # each example's first label is never trained
        [[-100, 6, 7, -100, 9], [-100, -100, 2, -100, -100]]
        >>> batch["position_ids"].tolist()  # positions restart at every example
        [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
        >>> batch["attention_mask"][0, 0].int().tolist()  # (rows, 1, 5, 5): row 0's two blocks
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    """

    tokenizer: transformers.PreTrainedTokenizer
    max_row_tokens: int
    attention: str = "mask"
    mask_dtype: torch.dtype | None = torch.bool

    def __call__(self, instances: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        lengths = [len(x["input_ids"]) for x in instances]
        if self.attention == "segments":
            return self.one_row(instances, lengths)
        rows = pack_rows(lengths, max(self.max_row_tokens, max(lengths)))
        order = [i for row in rows for i in row]  # examples in the order they are laid out, row after row
        n = torch.tensor([lengths[i] for i in order])
        row_of = torch.tensor([r for r, row in enumerate(rows) for _ in row])
        used = torch.zeros(len(rows), dtype=torch.long).index_add_(0, row_of, n)  # (rows,) tokens before padding
        width = int(used.max())
        # every token of the concatenated examples: its example, row, column and position within its example
        example = torch.repeat_interleave(torch.arange(len(order)), n)
        flat = torch.arange(int(n.sum()))
        first = n.cumsum(0) - n  # (examples,) flat index of each example's first token
        row, col = row_of[example], flat - (used.cumsum(0) - used)[row_of[example]]
        labels_flat = torch.cat([instances[i]["labels"] for i in order])
        labels_flat[first] = IGNORE_INDEX  # predicted by the previous example's last token: never trained
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        input_ids[row, col] = torch.cat([instances[i]["input_ids"] for i in order])
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        labels[row, col] = labels_flat
        position_ids = torch.arange(width).repeat(len(rows), 1) - used[:, None]  # padding counts from 0 after the row
        position_ids[row, col] = flat - first[example]
        segment = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: one segment of its own
        segment[row, col] = example
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids)
        if self.attention == "mask":
            batch["attention_mask"] = block_causal_mask(segment, self.mask_dtype)
        return batch

    def one_row(self, instances, lengths):
        """attention="segments": every example end to end in one row, no padding; segment_lengths tells the
        attention (training/segment_attention.py) where each example starts."""
        labels = torch.cat([x["labels"] for x in instances])
        n = torch.tensor(lengths)
        labels[n.cumsum(0) - n] = IGNORE_INDEX  # predicted by the previous example's last token: never trained
        return dict(
            input_ids=torch.cat([x["input_ids"] for x in instances])[None],
            labels=labels[None],
            position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            **{SEGMENT_KWARG: tuple(lengths)},
        )


def batch_to(batch, device):
    """A collated batch on device (its segment lengths, a tuple of ints, stay as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def block_causal_mask(segment, dtype=torch.bool):
    """(rows, 1, L, L): query t sees key s when s <= t and both belong to the same example. Bool (True = attend)
    for sdpa; for eager, an additive float mask (0 or the dtype's minimum)."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    if dtype == torch.bool:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def make_collator(tokenizer, model_config, max_row_tokens, padding_free=True):
    """The padded collator, or the padding-free one in the form the model's attention needs."""
    if not padding_free:
        return DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    impl = getattr(model_config, "_attn_implementation", None) or "eager"
    if impl == SEGMENTS:  # segment_attention.use_segments switched the model: one row, attention per example
        return DataCollatorPaddingFree(tokenizer, max_row_tokens, attention="segments")
    if "flash" in impl:
        return DataCollatorPaddingFree(tokenizer, max_row_tokens, attention="position_ids")
    return DataCollatorPaddingFree(
        tokenizer, max_row_tokens, mask_dtype=torch.bool if impl == "sdpa" else torch.float32
    )
