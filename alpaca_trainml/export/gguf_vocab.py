"""The tokenizer in a GGUF file: llama.cpp's "gpt2" model (byte-level BPE with merges, as SmolLM2's) or its "llama"
model (sentencepiece-style: scores, byte fallback), read from the checkpoint's tokenizer.json."""

import json
import logging

import gguf

from alpaca_trainml.cli import UserError

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


# The split regexes of the BPE families llama.cpp knows by name (as the tokenizer.json files of those families spell
# them); llama.cpp does not read the regex from the GGUF, only the name, so a wrong name splits text differently.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _WORDS + r"\p{N}{1,3}" + _REST  # numbers in groups of up to 3 digits
QWEN2_SPLIT = _WORDS + r"\p{N}" + _REST  # digits one by one
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}  # Llama 3.x, Qwen 2/2.5/3
PRE_TOKENIZERS = "gpt-2 (ByteLevel), smollm (Digits + ByteLevel), llama-bpe (Llama 3's split), qwen2 (Qwen's split)"


def pre_tokenizer(spec):
    """llama.cpp's name for how this byte-level BPE splits text before merging, read from tokenizer.json's
    pre_tokenizer; UserError for a split llama.cpp would not reproduce."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM/SmolLM2: digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name and steps[0].get("behavior") == "Isolated":
            return name
    raise UserError(
        f"tokenizer.json pre_tokenizer {json.dumps(pre)[:200]}: not a split llama.cpp has a name for here; "
        f"covered: {PRE_TOKENIZERS}"
    )


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
