"""Tiny random checkpoints of each architecture GGUF export covers, each with a tokenizer of its family's kind, all
built here (no hub): byte-level BPE with Llama 3's or Qwen's split, and sentencepiece with (Llama 2, Mistral, Phi-3)
or without (Gemma) the leading-space prefix."""

from pathlib import Path

import helpers

# The tokenization set: code, numbers, accents, CJK, emoji, runs of spaces and newlines.
TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
    "Pi is 3.14159, e is 2.71828; 1234567890 and 000 and -42.5e10.",
    "Café, naïve, façade, São Paulo, Zürich, Ærøskøbing, ½ ¾",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Emoji: 🦙🚀 👍🏽 ❤️ 👨‍👩‍👧",
    "runs of    spaces,  two  and\n\n\nthree newlines   \n end  ",
    "  leading spaces and trailing ones  ",
    "It's what they'd've said: I'M SURE you'LL see.",
    '<html><body class="x">Tom &amp; Jerry</body></html>',
]


def family_corpus(out_dir):
    """The tests' training text and the tokenization set, so that merges cover the unusual characters too."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "corpus.txt"
    path.write_text(helpers.corpus_text() + "\n" + "\n".join(TEXTS * 3))
    return path


def bpe_tokenizer(out_dir, family):
    """A byte-level BPE like Llama 3's ('llama3': its split, <|begin_of_text|> added) or Qwen's ('qwen2': its split,
    NFC, no BOS), saved as an HF tokenizer folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from alpaca_trainml.export.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT

    split = LLAMA3_SPLIT if family == "llama3" else QWEN2_SPLIT
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if family == "llama3" else ["<|endoftext|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    if family == "qwen2":
        bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train([str(family_corpus(out_dir))], trainer)
    if family == "llama3":
        bos = specials[0]
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=specials[1])
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=specials[0], pad_token=specials[0])
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def spm_tokenizer(out_dir, gemma=False):
    """A sentencepiece BPE with byte fallback: Llama-style (<unk> <s> </s>, a space prefix) or Gemma-style (<pad>
    <eos> <bos> <unk>, no space prefix, digits split), converted by transformers' own tokenizer class."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    spm.SentencePieceTrainer.train(
        input=str(family_corpus(out_dir)),
        model_prefix=str(Path(out_dir) / "tokenizer"),
        vocab_size=600,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        add_dummy_prefix=not gemma,
        split_digits=gemma,
        allow_whitespace_only_pieces=gemma,
        remove_extra_whitespaces=False,
        minloglevel=2,
        **ids,
    )
    tok = (GemmaTokenizer if gemma else LlamaTokenizer).from_pretrained(out_dir)
    hf = Path(out_dir) / "hf"
    tok.save_pretrained(hf)
    return hf


SHAPE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8
)
LLAMA3_ROPE = dict(  # Llama 3.1's rope_scaling with a short original context, so that all three bands occur
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=512,
)  # fmt: skip
ARCHS = {  # transformers config class, its extra settings, the tokenizer kind
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True), "llama3"),
    "mistral": ("MistralConfig", dict(sliding_window=None), "spm"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), "qwen2"),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False), "qwen2"),
    "gemma2": ("Gemma2Config", dict(query_pre_attn_scalar=8, sliding_window=512), "gemma"),
    "gemma3": ("Gemma3TextConfig", dict(query_pre_attn_scalar=8, sliding_window=512), "gemma"),
    "phi3": ("Phi3Config", dict(original_max_position_embeddings=1024, sliding_window=None), "spm"),
}


def tokenizer_for(kind, out_dir):
    if kind in ("llama3", "qwen2"):
        return bpe_tokenizer(out_dir, kind)
    return spm_tokenizer(out_dir, gemma=kind == "gemma")


def build(name, tokenizer_dir, out_dir, seed=0):
    """Save a tiny random `name` model (2 layers, hidden 32) with the tokenizer next to it. Weights are drawn wider
    than transformers' default (std 0.02) so that the greedy token wins by a margin over float rounding."""
    import torch
    import transformers

    config_class, extra, _ = ARCHS[name]
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = getattr(transformers, config_class)(
        vocab_size=len(tok), max_position_embeddings=1024, initializer_range=0.25, **SHAPE, **ids, **extra
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)
