"""Helpers shared by the tests: made-up Alpaca rows, a tiny Llama, ports and subprocess environments."""

import contextlib
import os
import random
import socket
from pathlib import Path

import transformers
from safetensors.torch import load_file

from alpaca_trainml.data.special_tokens import missing_special_tokens
from utils import PROMPT_DICT

ROOT = Path(__file__).resolve().parent.parent


_SUBJECTS = [
    "the river",
    "a small robot",
    "my neighbour",
    "the old library",
    "a red kite",
    "our team",
    "the teacher",
    "a quiet village",
    "the spreadsheet",
    "an orange cat",
    "the new bridge",
    "a chef",
]
_VERBS = ["describes", "builds", "remembers", "counts", "paints", "explains", "repairs", "sorts", "visits", "writes"]
_OBJECTS = [
    "three apples",
    "the weather report",
    "a long letter",
    "every number below ten",
    "a blue door",
    "the shortest path",
    "two short poems",
    "a list of rivers",
    "the final answer",
    "a wooden chair",
]
_TASKS = [
    "Summarize the text.",
    "Rewrite the sentence in a formal tone.",
    "Name the main subject.",
    "Classify the sentiment as positive or negative.",
    "List two facts about the topic.",
    "Give a one-word title.",
    "Translate the phrase into plain English.",
    "Count the words.",
]


def make_rows(n, seed=0, with_input_share=0.4):
    """n Alpaca rows of made-up sentences, deterministic for a seed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):

        def sent():
            return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."

        has_input = rng.random() < with_input_share
        rows.append(
            {
                "instruction": f"{rng.choice(_TASKS)} (task {i})",
                "input": " ".join(sent() for _ in range(rng.randint(1, 3))) if has_input else "",
                "output": " ".join(sent() for _ in range(rng.randint(1, 4))),
            }
        )
    return rows


def corpus_text():
    """A few KB of text covering the prompt templates and the made-up rows, for tokenizer training."""
    lines = [PROMPT_DICT["prompt_input"], PROMPT_DICT["prompt_no_input"]]
    for r in make_rows(300, seed=123):
        lines += [r["instruction"], r["input"], r["output"]]
    return "\n".join(line for line in lines if line)


def tiny_llama_config(vocab_size, **overrides):
    """The tests' Llama: 2 layers, hidden size 32, 4 heads over 2 key-value heads."""
    from transformers import LlamaConfig

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    shape.update(num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaConfig(vocab_size=vocab_size, **shape | overrides)


def build_tiny_llama(tokenizer_dir, out_dir, seed=0):
    """Save a 2-layer Llama (hidden 32) with the tokenizer next to it, loadable with from_pretrained."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = tiny_llama_config(
        len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


# The Llama family's tiny models (tests/test_llama_step.py): the tests' Llama shape with each family's differences.
# Windows of 8 positions, so that the tests' prompts (6 to 27 tokens) run past them.
_LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
FAMILIES = {
    "llama3-rope": (
        "llama",
        dict(rope_parameters=dict(_LLAMA3_ROPE, rope_theta=10000.0, original_max_position_embeddings=64)),
    ),
    "linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "yarn-rope": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0))),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", dict(sliding_window=8)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=16)),  # head_dim apart from hidden/heads (8), as Qwen3's own configs have it
    "phi3": ("phi3", dict(sliding_window=8)),  # q/k/v and gate/up fused in the checkpoint; Phi-3-mini has a window
}


def tiny_family_config(family, vocab_size, **ids):
    """A config of FAMILIES[family] in the tests' Llama shape (2 layers, hidden 32, 4 heads over 2 kv heads)."""
    from transformers import AutoConfig

    model_type, extra = FAMILIES[family]
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    shape.update(num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=None)
    # weights 5x transformers' default spread: at 0.02 a tiny model's greedy tokens hardly depend on the rope or the
    # window (the same 32 tokens with the unscaled rope, 2026-12-05); at 0.1 most of them change
    shape.update(initializer_range=0.1)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **shape | extra | ids)


def build_tiny_family(family, tokenizer_dir, out_dir, seed=0):
    """Save a tiny random model of FAMILIES[family] with the tokenizer next to it, loadable with from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, len(tok), **ids))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


# The tests' LoRA adapters on one base (tests/test_lora_*.py): name -> (target modules, rsLoRA). Random A and B
# (init_lora_weights=False): B is not zero, so that each adapter's greedy text differs from the base's.
LORA_ADAPTERS = {
    "qv": (["q_proj", "v_proj"], False),
    "all": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "mlp": (["o_proj", "down_proj", "up_proj"], True),
}


def build_lora_adapters(tokenizer_dir, out_dir, names=tuple(LORA_ADAPTERS), **shape):
    """A tiny Llama base (its tokenizer given a pad token, so that no special token is added and the adapters need no
    rows of their own) and LoRA adapters on it (r=4, lora_alpha=8), saved as peft saves them with the tokenizer:
    (base folder, {name: adapter folder}). shape: a config override, for a base the adapters do not fit."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.pad_token = tok.unk_token
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    base = LlamaForCausalLM(tiny_llama_config(len(tok), **ids, **shape))
    base.save_pretrained(out_dir / "base")
    tok.save_pretrained(out_dir / "base")
    folders = {}
    for i, name in enumerate(names):
        targets, rslora = LORA_ADAPTERS[name]
        torch.manual_seed(i + 1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(out_dir / "base"), config)
        folders[name] = out_dir / name
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    return out_dir / "base", folders


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def umask(mask):
    """Run the block under this umask (e.g. 0o022), then restore the previous one."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(*paths):
    """{path: permission bits} of each path and, for a folder, of everything under it: {"x/a.json": 0o644, ...}."""
    found = {}
    for path in map(Path, paths):
        for p in [path, *(sorted(path.rglob("*")) if path.is_dir() else [])]:
            found[str(p)] = p.stat().st_mode & 0o777
    return found


def expected_modes(found, mask):
    """What open()/mkdir() would have given each path in found under umask mask."""
    return {p: (0o777 if Path(p).is_dir() else 0o666) & ~mask for p in found}


def subprocess_env(**extra):
    """Environment for launching the repo's scripts: offline, the repo importable, one thread."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def call_app(app, *requests, generate=True):
    """Send (method, path, kwargs) requests concurrently to the app in process; the model thread runs meanwhile
    (generate=False: no model thread, for routes that need none)."""
    import asyncio

    import httpx

    async def go():
        if generate:
            app.state.engine.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client:
                return await asyncio.gather(*(client.request(m, p, **kw) for m, p, kw in requests))
        finally:
            app.state.engine.stop()

    return asyncio.run(go())


def serve_in_thread(argv):
    """serve.py's own server (parse_args, build_server) on a thread of this process: a context manager with .url and
    .stop(). A separate process would import torch again, which costs minutes on a busy 2-core machine; the HTTP path
    is the same."""
    import serve

    return serve.ServerThread(serve.build_server(serve.parse_args(argv)))


def alpaca_chat_prompt(chat):
    """A plain re-statement of how the Alpaca chat template places a chat (chat_template.py's docstring), as
    (instruction, input or None); ValueError where the template refuses the chat. chat: [{"role", "content"}], the
    content a string, None, or OpenAI's text parts."""

    def text(m):
        c = m.get("content")
        if isinstance(c, list):
            if any(p.get("type") != "text" for p in c):
                raise ValueError("only text content parts")
            return "".join(p.get("text") or "" for p in c).strip()
        return (c or "").strip()

    if not chat or chat[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    system, turns = [], []
    for m in chat[:-1]:
        if m["role"] not in ("system", "developer", "user", "assistant"):
            raise ValueError(f"role {m['role']}")
        if text(m):
            (system if m["role"] in ("system", "developer") else turns).append(
                text(m) if m["role"] in ("system", "developer") else f"{m['role'].capitalize()}: {text(m)}"
            )
    if not text(chat[-1]):
        raise ValueError("the last message is empty")
    return text(chat[-1]), "\n\n".join(system + (["\n".join(turns)] if turns else [])) or None


def original_labels(sources, targets, tokenizer):
    """A plain re-statement of the original Alpaca preprocess(): one string at a time, return_tensors='pt'."""

    def tok(strings):
        out = [
            tokenizer(
                s, return_tensors="pt", padding="longest", max_length=tokenizer.model_max_length, truncation=True
            ).input_ids[0]
            for s in strings
        ]
        return out, [t.ne(tokenizer.pad_token_id).sum().item() for t in out]

    input_ids, _ = tok([s + t for s, t in zip(sources, targets)])
    _, source_lens = tok(sources)
    labels = [x.clone() for x in input_ids]
    for label, n in zip(labels, source_lens):
        label[:n] = -100
    return input_ids, labels


def load_tokenizer(path, max_length=64):
    tok = transformers.AutoTokenizer.from_pretrained(path, model_max_length=max_length, padding_side="right")
    tok.add_special_tokens(missing_special_tokens(tok))
    return tok


def load_all(folder):
    """Every tensor of a saved folder (single file or shards), as {name: tensor}."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out
