"""Shared fixtures: tokenizers trained at test time and a 2-layer Llama built here. No network, no hub."""

import json
import os
import random
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from utils import PROMPT_DICT  # noqa: E402

_SUBJECTS = ["the river", "a small robot", "my neighbour", "the old library", "a red kite", "our team",
             "the teacher", "a quiet village", "the spreadsheet", "an orange cat", "the new bridge", "a chef"]
_VERBS = ["describes", "builds", "remembers", "counts", "paints", "explains", "repairs", "sorts", "visits", "writes"]
_OBJECTS = ["three apples", "the weather report", "a long letter", "every number below ten", "a blue door",
            "the shortest path", "two short poems", "a list of rivers", "the final answer", "a wooden chair"]
_TASKS = ["Summarize the text.", "Rewrite the sentence in a formal tone.", "Name the main subject.",
          "Classify the sentiment as positive or negative.", "List two facts about the topic.",
          "Give a one-word title.", "Translate the phrase into plain English.", "Count the words."]


def make_rows(n, seed=0, with_input_share=0.4):
    """n Alpaca rows of made-up sentences, deterministic for a seed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sent = lambda: f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."  # noqa: E731
        has_input = rng.random() < with_input_share
        rows.append({
            "instruction": f"{rng.choice(_TASKS)} (task {i})",
            "input": " ".join(sent() for _ in range(rng.randint(1, 3))) if has_input else "",
            "output": " ".join(sent() for _ in range(rng.randint(1, 4))),
        })
    return rows


def corpus_text():
    """A few KB of text covering the prompt templates and the made-up rows, for tokenizer training."""
    lines = [PROMPT_DICT["prompt_input"], PROMPT_DICT["prompt_no_input"]]
    for r in make_rows(300, seed=123):
        lines += [r["instruction"], r["input"], r["output"]]
    return "\n".join(line for line in lines if line)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text())
    return path


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory, corpus_file):
    """A Llama-style sentencepiece tokenizer (<unk>, <s>, </s>; no pad token), trained here."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        input=str(corpus_file), model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
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
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train([str(corpus_file)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(out)
    return out


def build_tiny_llama(tokenizer_dir, out_dir, seed=0):
    """Save a 2-layer Llama (hidden 32) with the tokenizer next to it, loadable with from_pretrained."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, spm_tokenizer_dir):
    """A 2-layer Llama with the sentencepiece tokenizer, saved as a normal HF folder."""
    return build_tiny_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def data_file(tmp_path):
    """Write rows to a JSON file in tmp_path and return its path."""
    def _write(rows, name="data.json"):
        path = tmp_path / name
        path.write_text(json.dumps(rows))
        return path
    return _write


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    return _free_port()


@pytest.fixture(scope="module")
def free_port_module():
    """One port for a module's server fixture."""
    return _free_port()


def subprocess_env(**extra):
    """Environment for launching the repo's scripts: offline, the repo importable, one thread."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def serve_in_thread(argv):
    """serve.py's own server (parse_args, build_server) on a thread of this process: a context manager with .url and
    .stop(). A separate process would import torch again, which costs minutes on a busy 2-core machine; the HTTP path
    is the same."""
    import serve

    return serve.ServerThread(serve.build_server(serve.parse_args(argv)))
