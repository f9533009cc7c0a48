"""export_gguf.py and alpaca_trainml/export: a tiny Llama built here -> GGUF -> read back with gguf's reader; and,
when .venv-peers has llama-cpp-python, llama.cpp on the exported embedded model gives InstructModel's greedy tokens,
and the same answers through its chat API with the chat template the file carries."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from helpers import ROOT

from alpaca_trainml.cli import UserError
from alpaca_trainml.data.chat_template import install_chat_template
from alpaca_trainml.export.arch import rope_permute
from alpaca_trainml.export.gguf import export

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def field(reader, key):
    f = reader.get_field(key)
    return f.contents() if f is not None else None


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("outtype, tolerance", [("f32", 0), ("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_round_trip_through_gguf_reader(tiny_llama_dir, tmp_path, hf, outtype, tolerance):
    out = export(tiny_llama_dir, tmp_path / f"tiny-{outtype}.gguf", outtype)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 9 + 3  # 9 tensors per layer, embeddings, final norm, output (untied)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 2 and field(reader, "llama.attention.head_count_kv") == 2
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tok) and tokens[5] == tok.convert_ids_to_tokens(5)
    assert field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.chat_template") == install_chat_template(tok).chat_template  # the Alpaca one
    pairs = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "blk.1.attn_q.weight": rope_permute(hf["model.layers.1.self_attn.q_proj.weight"], 4),  # GGUF's rope layout
        "blk.0.ffn_down.weight": hf["model.layers.0.mlp.down_proj.weight"],
        "output_norm.weight": hf["model.norm.weight"],
    }
    for name, want in pairs.items():
        t = tensors[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.allclose(got, want.numpy(), atol=tolerance * float(want.abs().max()) + 1e-7), name


def test_bad_inputs_name_what_is_wrong_and_what_is_supported(tmp_path, tiny_llama_dir):
    with pytest.raises(UserError, match="not a checkpoint.*config.json"):
        export(tmp_path, tmp_path / "x.gguf")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="GPT2LMHeadModel.*supports llama"):
        export(other, tmp_path / "x.gguf")
    run = subprocess.run(
        [sys.executable, str(ROOT / "export_gguf.py"), str(tmp_path / "missing"), str(tmp_path / "x.gguf")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("export_gguf.py: error:")


def peers_have_llama_cpp():
    if not PEERS_PYTHON.exists():
        return False
    return subprocess.run([str(PEERS_PYTHON), "-c", "import llama_cpp"], capture_output=True).returncode == 0


LLAMA_CPP_GREEDY = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False)
job, answers = json.loads(sys.stdin.read()), []
for ids in job["prompts"]:
    out = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == 32 or tok == llm.token_eos():
            break
    answers.append(out)
chats = [  # through llama.cpp's chat API: the GGUF's chat template (ours) renders the prompt
    llm.create_chat_completion(
        [{"role": "user", "content": text}], temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=32
    )["choices"][0]["message"]["content"]
    for text in job["chats"]
]
print(json.dumps(dict(greedy=answers, chats=chats)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not peers_have_llama_cpp(), reason="needs .venv-peers with llama-cpp-python (make peers)")
def test_llama_cpp_gives_our_greedy_tokens_on_the_exported_embedded_model(tmp_path):
    from alpaca_trainml.generation.decoding import GenParams
    from alpaca_trainml.generation.model import InstructModel
    from alpaca_trainml.models import embedded_model_path

    out = export(embedded_model_path(), tmp_path / "smollm2-f32.gguf", "f32")
    model = InstructModel(embedded_model_path())
    instructions = ["Name three colours.", "Write a haiku about rain.", "What is 12 times 7?", "Define entropy.", "Hi"]
    prompts = [model.encode_instruction(i) for i in instructions]
    ours = [model.generate([p], GenParams(max_tokens=32, temperature=0))[0] for p in prompts]
    run = subprocess.run(
        [str(PEERS_PYTHON), "-c", LLAMA_CPP_GREEDY, str(out)],
        input=json.dumps(dict(prompts=prompts, chats=instructions[:2])),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    eos = set(model.eos_ids)
    for mine, tokens in zip(ours, theirs["greedy"]):
        text = model.decode([t for t in tokens if t not in eos])
        assert text == mine.text and len(tokens) == mine.completion_tokens
    for mine, chat in zip(ours, theirs["chats"]):  # a one-message chat is the Alpaca prompt of its instruction
        assert chat.strip() == mine.text.strip()


def test_the_gguf_file_gets_the_mode_the_umask_gives(tiny_llama_dir, tmp_path):
    from helpers import umask

    with umask(0o022):
        out = export(tiny_llama_dir, tmp_path / "tiny.gguf", "f16")
    assert out.stat().st_mode & 0o777 == 0o644  # 0666 & ~022: another account can serve it
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]  # the work folder is gone
