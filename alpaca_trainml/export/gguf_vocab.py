"""The tokenizer in a GGUF file: llama.cpp's "gpt2" model (byte-level BPE with merges, as SmolLM2's) or its "llama"
model (sentencepiece-style: scores, byte fallback), read from the checkpoint's tokenizer.json."""

import json
import logging

import gguf

logger = logging.getLogger(__name__)


def tokenizer_json(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{tokenizer.name_or_path}: GGUF export needs a fast tokenizer (tokenizer.json)")
    return json.loads(backend.to_str())


def token_types(tokenizer, vocab_size, byte_tokens):
    """(tokens by id, their gguf.TokenType), padded to the model's vocab_size with unused tokens."""
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = tokenizer.added_tokens_decoder
    types = []
    for i, t in enumerate(tokens):
        if i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif byte_tokens and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]  # embedding rows past the tokenizer (padded vocab)
    types += [gguf.TokenType.UNUSED] * (vocab_size - n)
    return tokens, types


def pre_tokenizer(spec):
    """llama.cpp's name for how text is split before BPE: GPT-2's regex when ours is plain ByteLevel with it."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for GPT-2's split
    logger.warning("pre-tokenizer %s has no llama.cpp name we know; written as 'default'", pre.get("type"))
    return "default"


def add_tokenizer(writer, tokenizer, vocab_size, end_of_turn=None):
    """The tokenizer's model, vocabulary, special ids and chat template. end_of_turn: the token text that closes an
    assistant turn in the checkpoint's prompt style, written as EOT so that llama.cpp stops there."""
    spec = tokenizer_json(tokenizer)
    model = spec["model"]
    if model["type"] == "BPE" and not model.get("byte_fallback"):
        tokens, types = token_types(tokenizer, vocab_size, byte_tokens=False)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(spec))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    elif model["type"] in ("BPE", "Unigram"):  # sentencepiece converted to tokenizer.json
        tokens, types = token_types(tokenizer, vocab_size, byte_tokens=True)
        if model["type"] == "Unigram":
            scores = [float(s) for _, s in model["vocab"]]
        else:  # sentencepiece BPE lists its pieces best first: the rank is the merge priority
            scores = [-float(i) for i in range(len(tokenizer))]
        scores += [-1e4] * (len(tokens) - len(scores))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores[: len(tokens)])
        writer.add_add_space_prefix("Prepend" in json.dumps(spec.get("normalizer")) or _metaspace_prepends(spec))
    else:
        raise ValueError(f"tokenizer model {model['type']}: GGUF export covers byte-level BPE and sentencepiece")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if getattr(tokenizer, key, None) is not None:
            add(getattr(tokenizer, key))
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tokenizer.eos_token_id and len(ids) > 1)
    eot = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    if eot is not None and eot != tokenizer.unk_token_id:
        writer.add_eot_token_id(eot)
    writer.add_chat_template(tokenizer.chat_template)  # the prompt style's template, as the checkpoint saved it


def _metaspace_prepends(spec):
    pre = json.dumps(spec.get("pre_tokenizer"))
    return "Metaspace" in pre and '"never"' not in pre
