"""export/arch.py and the families' tokenizers, on a tiny random model of each architecture GGUF export covers (built
in tests/tiny_archs.py, no hub): train.py trains it (full and LoRA) and the result exports; the GGUF reads back
through gguf's reader with the names and transforms llama.cpp expects; with .venv-peers, llama.cpp loads each file,
tokenizes a varied text set into transformers' ids and gives transformers' greedy tokens."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import tiny_archs
import torch
import transformers
from helpers import ROOT, make_rows, subprocess_env
from test_export_gguf import PEERS_PYTHON, field, peers_have_llama_cpp

import train
from alpaca_trainml.cli import UserError
from alpaca_trainml.export.arch import rope_permute
from alpaca_trainml.export.gguf import export
from alpaca_trainml.export.gguf_vocab import pre_tokenizer

GGUF_ARCH = dict(llama3="llama", mistral="llama", qwen2="qwen2", qwen3="qwen3", gemma2="gemma2", gemma3="gemma3")
GGUF_ARCH["phi3"] = "phi3"
PRE = dict(llama3="llama-bpe", qwen2="qwen2", spm="default", gemma="default")  # tokenizer.ggml.pre by tokenizer kind


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_tokenizers")
    return {kind: tiny_archs.tokenizer_for(kind, root / kind) for kind in PRE}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizers):
    root = tmp_path_factory.mktemp("tiny_archs")
    return {
        name: tiny_archs.build(name, tokenizers[kind], root / name) for name, (_, _, kind) in tiny_archs.ARCHS.items()
    }


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {name: export(folder, root / f"{name}.gguf", "f32") for name, folder in checkpoints.items()}


def llama3_factors(rope, head_dim):
    """Llama 3.1's published rope rule, written out here: frequencies with long wavelengths are divided by `factor`,
    short ones kept, the band between blended."""
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return out


def expected_tensors(name, hf):
    """{GGUF tensor: what it must hold}, from the HF weights and llama.cpp's conventions for the architecture."""
    layer = "model.layers.1."
    want = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "blk.1.ffn_down.weight": hf[layer + "mlp.down_proj.weight"],
    }
    if GGUF_ARCH[name] == "llama":  # llama.cpp's "normal" rope: each head's q/k rows interleaved
        want["blk.1.attn_q.weight"] = rope_permute(hf[layer + "self_attn.q_proj.weight"], 4)
        want["blk.1.attn_k.weight"] = rope_permute(hf[layer + "self_attn.k_proj.weight"], 2)
    elif name != "phi3":  # NEOX rope: transformers' layout as is
        want["blk.1.attn_k.weight"] = hf[layer + "self_attn.k_proj.weight"]
    if name == "llama3":
        want["rope_freqs.weight"] = torch.tensor(llama3_factors(tiny_archs.LLAMA3_ROPE, 8))
    if name == "qwen2":
        want["blk.1.attn_q.bias"] = hf[layer + "self_attn.q_proj.bias"]
    if name in ("qwen3", "gemma3"):
        offset = 1.0 if name == "gemma3" else 0.0  # Gemma's RMSNorm scales by 1 + w
        want["blk.1.attn_k_norm.weight"] = hf[layer + "self_attn.k_norm.weight"] + offset
    if name in ("gemma2", "gemma3"):
        want["blk.1.post_ffw_norm.weight"] = hf[layer + "post_feedforward_layernorm.weight"] + 1.0
        want["output_norm.weight"] = hf["model.norm.weight"] + 1.0
    if name == "phi3":  # fused as transformers keeps them
        want["blk.1.attn_qkv.weight"] = hf[layer + "self_attn.qkv_proj.weight"]
        want["blk.1.ffn_up.weight"] = hf[layer + "mlp.gate_up_proj.weight"]
    return want


@pytest.mark.parametrize("name", list(tiny_archs.ARCHS))
def test_gguf_holds_the_architecture_under_ggufs_names_with_llama_cpps_transforms(name, checkpoints, exported):
    reader = gguf.GGUFReader(exported[name])
    arch = GGUF_ARCH[name]
    assert field(reader, "general.architecture") == arch and field(reader, f"{arch}.block_count") == 2
    assert field(reader, "tokenizer.ggml.pre") == PRE[tiny_archs.ARCHS[name][2]]
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32)
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (name in ("qwen3", "mistral", "phi3"))  # untied, or phi3 (always written)
    for gguf_name, want in expected_tensors(name, model.state_dict()).items():
        t = tensors[gguf_name]
        got = np.asarray(t.data, dtype=np.float32).reshape(want.shape)
        assert np.allclose(got, want.numpy(), atol=1e-6), gguf_name
    if name == "gemma2":  # the soft-caps and the window (transformers' defaults 50 and 30)
        assert field(reader, "gemma2.attn_logit_softcapping") == 50.0
        assert field(reader, "gemma2.final_logit_softcapping") == 30.0
    if name in ("gemma2", "gemma3"):
        assert (
            field(reader, f"{arch}.attention.sliding_window") == 512
            and field(reader, "tokenizer.ggml.add_space_prefix") is False
        )


def test_an_unsupported_architecture_or_rope_or_split_gets_one_line_naming_the_covered_ones(
    checkpoints, tokenizers, tmp_path
):
    config = json.loads((checkpoints["qwen2"] / "config.json").read_text())
    for change in (
        dict(model_type="falcon", architectures=["FalconForCausalLM"]),
        dict(rope_parameters={"rope_type": "yarn"}),
    ):
        folder = tmp_path / "bad"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(UserError) as e:
            export(folder, tmp_path / "x.gguf")
        assert "\n" not in str(e.value) and "qwen3" in str(e.value) and "gemma2" in str(e.value)
    folder = Path(shutil.copytree(checkpoints["llama3"], tmp_path / "odd_split"))
    spec = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps(spec | {"pre_tokenizer": {"type": "Whitespace"}}))
    with pytest.raises(UserError, match="covered: gpt-2.*smollm.*llama-bpe.*qwen2"):
        export(folder, tmp_path / "y.gguf")
    assert pre_tokenizer(json.loads(tokenizers["qwen2"].joinpath("tokenizer.json").read_text())) == "qwen2"


@pytest.mark.parametrize("name", list(tiny_archs.ARCHS))
def test_train_py_trains_each_architecture_full_and_lora_and_the_result_exports(name, checkpoints, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(make_rows(8, seed=3)))
    before = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name]).state_dict()
    for lora in (False, True):
        out = tmp_path / f"out-lora{lora}"
        argv = [
            "--model_name_or_path", str(checkpoints[name]), "--data_path", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--learning_rate", "1e-2",
            "--save_strategy", "no", "--report_to", "none", "--model_max_length", "256",
        ] + (["--use_peft", "True", "--lora_r", "2"] if lora else [])  # fmt: skip
        trainer = train.train(argv)
        merged = trainer.model.merge_and_unload() if lora else trainer.model
        changed = [k for k, v in merged.state_dict().items() if k in before and before[k].shape == v.shape]
        assert any(not torch.equal(before[k], merged.state_dict()[k].cpu()) for k in changed), "no weight moved"
        reader = gguf.GGUFReader(export(out, tmp_path / f"trained-lora{lora}.gguf", "f16"))
        assert len(field(reader, "tokenizer.ggml.tokens")) == merged.config.vocab_size  # train.py added [PAD]


LLAMA_CPP_JOB = """
import json, sys
from llama_cpp import Llama
job, out = json.loads(sys.stdin.read()), {}
for name, path in job["files"].items():
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False)
    greedy = []
    for ids in job["prompts"][name]:
        tokens = []
        for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(tok)
            if len(tokens) == job["n"]:
                break
        greedy.append(tokens)
    texts = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in job["texts"]]
    out[name] = dict(texts=texts, greedy=greedy)
    del llm
print(json.dumps(out))
"""
N_TOKENS = 16
PROMPTS = ["Write a haiku about rain.", "def add(a, b):", "Zürich has 1234 cafés"]


def transformers_greedy(folder, prompts):
    """(prompt ids, greedy ids, how many of them to compare): the comparison stops at the first step whose top two
    logits are within 1e-2, where float rounding may legitimately pick either."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for text in prompts:
        ids = tok(text)["input_ids"]
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        gaps = [float(s[0].topk(2).values.diff().abs()) for s in gen.scores]
        sure = next((i for i, g in enumerate(gaps) if g < 1e-2), N_TOKENS)
        out.append((ids, gen.sequences[0, len(ids) :].tolist(), sure))
    return out


def expected_ids(tok, kind, tokenizer_dir, text):
    """transformers' ids; for a sentencepiece with a space prefix and a text that starts with a space, sentencepiece's
    own ids: transformers' converted tokenizer adds no prefix there, sentencepiece and llama.cpp do."""
    if kind == "spm" and text[:1].isspace():
        return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir.parent / "tokenizer.model")).encode(
            text
        )
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@pytest.mark.skipif(not peers_have_llama_cpp(), reason="needs .venv-peers with llama-cpp-python (make peers)")
def test_llama_cpp_tokenizes_like_transformers_and_gives_its_greedy_tokens(checkpoints, exported, tokenizers):
    ours = {name: transformers_greedy(folder, PROMPTS) for name, folder in checkpoints.items()}
    job = dict(files={n: str(p) for n, p in exported.items()}, texts=tiny_archs.TEXTS, n=N_TOKENS)
    job["prompts"] = {n: [ids for ids, _, _ in runs] for n, runs in ours.items()}
    run = subprocess.run(
        [str(PEERS_PYTHON), "-c", LLAMA_CPP_JOB], input=json.dumps(job), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    for name, runs in ours.items():
        kind = tiny_archs.ARCHS[name][2]
        tok = transformers.AutoTokenizer.from_pretrained(checkpoints[name])
        for text, got in zip(tiny_archs.TEXTS, theirs[name]["texts"]):
            assert got == expected_ids(tok, kind, tokenizers[kind], text), (name, text)
        for (_, mine, sure), got in zip(runs, theirs[name]["greedy"]):
            assert got[:sure] == mine[:sure], name
        assert sum(sure for _, _, sure in runs) >= N_TOKENS, f"{name}: too few greedy tokens were compared"


DOC_COMMANDS = [  # docs/architectures.md, verbatim
    "python export_gguf.py out/qwen2-tuned qwen2-q5_1.gguf --outtype q5_1",
    "python export_gguf.py out/gemma2-tuned gemma2-f16.gguf --outtype f16",
]


@pytest.mark.slow
def test_the_documented_export_commands_run_as_printed(checkpoints, tmp_path):
    for name in ("qwen2", "gemma2"):
        shutil.copytree(checkpoints[name], tmp_path / "out" / f"{name}-tuned")
    env = subprocess_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command in DOC_COMMANDS:
        command = command.replace("export_gguf.py", str(ROOT / "export_gguf.py"))
        run = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-2000:]
    assert field(gguf.GGUFReader(tmp_path / "qwen2-q5_1.gguf"), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q5_1
    assert field(gguf.GGUFReader(tmp_path / "gemma2-f16.gguf"), "general.architecture") == "gemma2"
