"""The special-token rule, in one place: which Alpaca tokens a tokenizer gets, the embedding resize, and the
mean initialisation of the new rows. train.py applies it to a loaded model; weight_diff.py re-derives the same
rows from a checkpoint on disk, streamed in row blocks, so a diff can be made and recovered without the model in memory.
"""

from typing import Dict

import torch
import transformers

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"


MEAN_BLOCK_ROWS = 1024  # fixed, so make_diff and recover sum the mean row in the same order


def missing_special_tokens(tokenizer) -> Dict[str, str]:
    """The Alpaca default special tokens that the tokenizer lacks."""
    defaults = dict(
        pad_token=DEFAULT_PAD_TOKEN,
        eos_token=DEFAULT_EOS_TOKEN,
        bos_token=DEFAULT_BOS_TOKEN,
        unk_token=DEFAULT_UNK_TOKEN,
    )
    return {name: tok for name, tok in defaults.items() if getattr(tokenizer, name) is None}


def smart_tokenizer_and_embedding_resize(
    special_tokens_dict: Dict,
    tokenizer: transformers.PreTrainedTokenizer,
    model: transformers.PreTrainedModel,
):
    """Add special tokens and resize the embeddings; new rows start at the mean of the old ones.

    Note: this is the unoptimized version that may make your embedding size not be divisible by 64.
    """
    num_new_tokens = tokenizer.add_special_tokens(special_tokens_dict)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if num_new_tokens > 0:
        input_embeddings = model.get_input_embeddings().weight.data
        output_embeddings = model.get_output_embeddings().weight.data
        input_embeddings[-num_new_tokens:] = input_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
        output_embeddings[-num_new_tokens:] = output_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
    align_token_ids(tokenizer, model)


def align_token_ids(tokenizer, model):
    """Write the tokenizer's pad, bos and eos ids into the model's config and generation config. The Trainer does the
    same when they differ (the [PAD] just added), with a warning in every run; a list of eos ids keeps its others."""
    configs = [model.config.get_text_config(), getattr(model, "generation_config", None)]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name)
        for config in (c for c in configs if c is not None and token_id is not None):
            held = getattr(config, name, None)
            if isinstance(held, list):
                if token_id not in held:
                    setattr(config, name, [token_id, *held])
            elif held != token_id:
                setattr(config, name, token_id)


def embedding_resize(path_raw, model, keys):
    """{embedding tensor name: (rows kept, rows added)} as train.py resizes the raw model.

    Like smart_tokenizer_and_embedding_resize: the tables become len(tokenizer) rows, the last
    `added` of them the mean of the rows before. We add what train.py adds (missing_special_tokens):
    for LLaMA that is the original's single [PAD]; for other tokenizers the shapes then match."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path_raw)
    added = tokenizer.add_special_tokens(missing_special_tokens(tokenizer))
    tables = [model.get_input_embeddings(), model.get_output_embeddings()]
    ids = {id(t.weight) for t in tables if t is not None}
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids and n in keys]
    return {n: (len(tokenizer) - added, added) for n in names}


def mean_row(raw, key, keep):
    """(1, hidden) fp32 mean of rows 0:keep, summed in fp64 over fixed blocks: the same bits every run.
    The original took torch's fp32 mean of the whole table; the two differ by float rounding only."""
    acc = torch.zeros(raw.shapes[key][1:], dtype=torch.float64)
    for i in range(0, keep, MEAN_BLOCK_ROWS):
        acc += raw.rows(key, i, min(i + MEAN_BLOCK_ROWS, keep)).sum(0, dtype=torch.float64)
    return (acc / keep).to(torch.float32).unsqueeze(0)


def raw_rows(raw, key, start, stop, resize, means):
    """Rows start:stop of the raw tensor after the resize; rows from `keep` on are the mean row."""
    if key not in resize:
        return raw.rows(key, start, stop)
    keep, start, stop = resize[key][0], start or 0, stop if stop is not None else sum(resize[key])
    parts = [raw.rows(key, start, min(stop, keep))] if start < keep else []
    if stop > keep:
        parts.append(means[key].expand(stop - max(start, keep), -1))
    return torch.cat(parts)
