"""Shared fixtures: tokenizers trained at test time and a 2-layer Llama built here. No network, no hub.

Helper functions live in tests/helpers.py; pyproject.toml's pytest pythonpath makes the repo and tests/ importable."""

import json
import os

import helpers
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(helpers.corpus_text())
    return path


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory, corpus_file):
    """A Llama-style sentencepiece tokenizer (<unk>, <s>, </s>; no pad token), trained here."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        input=str(corpus_file),
        model_prefix=str(out / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    tok = LlamaTokenizer.from_pretrained(out)  # converts tokenizer.model (needs protobuf)
    assert len(tok) == 400, "the sentencepiece model did not load"  # vocab_size above
    hf_dir = out / "hf"
    tok.save_pretrained(hf_dir)
    return hf_dir


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, corpus_file):
    """A byte-level BPE tokenizer with only an end-of-text token, like GPT-2's: no pad, bos or unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train([str(corpus_file)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, spm_tokenizer_dir):
    """A 2-layer Llama with the sentencepiece tokenizer, saved as a normal HF folder."""
    return helpers.build_tiny_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def data_file(tmp_path):
    """Write rows to a JSON file in tmp_path and return its path."""

    def _write(rows, name="data.json"):
        path = tmp_path / name
        path.write_text(json.dumps(rows))
        return path

    return _write


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory, spm_tokenizer_dir):
    """(base folder, {name: adapter folder}): a tiny Llama and the LoRA adapters of helpers.LORA_ADAPTERS on it."""
    return helpers.build_lora_adapters(spm_tokenizer_dir, tmp_path_factory.mktemp("lora"))


@pytest.fixture
def free_port():
    return helpers.free_port()


@pytest.fixture(scope="module")
def free_port_module():
    """One port for a module's server fixture."""
    return helpers.free_port()


@pytest.fixture(scope="session")
def decode_kernel():
    """Our compiled decode kernel (generation/matvec.py); its tests skip where it cannot be built."""
    from alpaca_trainml.generation import matvec

    built = matvec.kernel()
    if built is None:
        pytest.skip("the decode kernel could not be built here (no compiler?); decoding falls back to torch")
    return built
