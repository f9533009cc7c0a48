"""Collators: the original's padded micro-batches, and the padding-free layout train.py uses by default."""

from dataclasses import dataclass
from typing import Dict, Sequence

import torch
import transformers

from utils import IGNORE_INDEX


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
    """Spread example indices over as few rows of at most max_row_tokens tokens as fit, with sums as even as
    possible, since every row is padded to the longest: longest first, each into the emptiest row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n_rows = max(1, -(-sum(lengths) // max_row_tokens))
    while True:
        rows, sums = [[] for _ in range(n_rows)], [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=sums.__getitem__)
            if sums[r] + lengths[i] > max_row_tokens:
                break  # it fits in no row: one row more
            rows[r].append(i)
            sums[r] += lengths[i]
        else:
            return [sorted(row) for row in rows if row]
        n_rows += 1


@dataclass
class DataCollatorPaddingFree:
    """The same micro-batch as DataCollatorForSupervisedDataset, laid end to end with no padding between examples.

    Examples are packed into rows of at most max_row_tokens (one long row would make attention cost more than the
    padding saved). Positions restart at each example and each example's first label is IGNORE_INDEX, so the
    loss is the mean over the same trained tokens. attention: "mask" builds an exact block-diagonal causal mask
    (bool for sdpa, additive float for eager); "position_ids" leaves isolation to flash-attention's varlen path.

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
        rows = pack_rows(lengths, max(self.max_row_tokens, max(lengths)))
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segment = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: one segment of its own
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = lengths[i]
                input_ids[r, start : start + n] = instances[i]["input_ids"]
                labels[r, start : start + n] = instances[i]["labels"]
                labels[r, start] = IGNORE_INDEX  # predicted by the previous example's last token: never trained
                position_ids[r, start : start + n] = torch.arange(n)
                segment[r, start : start + n] = i
                start += n
            position_ids[r, start:] = torch.arange(width - start)
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids)
        if self.attention == "mask":
            batch["attention_mask"] = block_causal_mask(segment, self.mask_dtype)
        return batch


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
    if "flash" in impl:
        return DataCollatorPaddingFree(tokenizer, max_row_tokens, attention="position_ids")
    return DataCollatorPaddingFree(
        tokenizer, max_row_tokens, mask_dtype=torch.bool if impl == "sdpa" else torch.float32
    )
