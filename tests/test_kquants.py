"""export/kquants.py: the k-quants through llama.cpp's own quantizer, from .venv-peers' llama-cpp-python. export()
in this environment reaches it as `llama-quantize` on PATH (a stand-in script here that calls llama_model_quantize in
.venv-peers), so both ways in are run; llama.cpp then loads each file and answers, and the block types q4_0 to q5_1
that gguf's quantizers wrote load too."""

import json
import os
import subprocess

import gguf
import pytest
import torch
import transformers
from helpers import ROOT, tiny_llama_config
from test_export_gguf import PEERS_PYTHON, peers_have_llama_cpp

from alpaca_trainml.export import kquants
from alpaca_trainml.export.gguf import export

Q = gguf.GGMLQuantizationType
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not peers_have_llama_cpp(), reason="needs .venv-peers with llama-cpp-python (make peers)"),
]
STAND_IN = """#!/bin/sh
# llama-quantize SRC DST TYPE THREADS, as llama.cpp's tool takes them: llama_model_quantize in .venv-peers
PYTHONPATH={root} exec {python} -c "import sys; from alpaca_trainml.export import kquants; \\
kquants.quantize(sys.argv[1], sys.argv[2], sys.argv[3].lower(), int(sys.argv[4]))" "$@"
"""
LLAMA_CPP_PLAIN_BUFFERS = """
import llama_cpp.llama_cpp as lc
_default = lc.llama_model_default_params
def _plain():  # no AMX / repacked weight buffers: llama.cpp 0.3.36 dies in them (SIGILL) on an AMX_INT8 CPU
    params = _default()
    params.use_extra_bufts = False
    return params
lc.llama_model_default_params = _plain
"""
LOAD_AND_ANSWER = (
    LLAMA_CPP_PLAIN_BUFFERS
    + """
import json, sys
from llama_cpp import Llama
out = {}
for path in sys.argv[1:]:
    llm = Llama(model_path=path, n_ctx=128, n_threads=2, verbose=False)
    out[path] = [t for _, t in zip(range(8), llm.generate([1, 5, 17, 42], top_k=1, temp=0.0, reset=True))]
print(json.dumps(out))
"""
)


@pytest.fixture(scope="module")
def llama_256(tmp_path_factory, spm_tokenizer_dir):
    """A 2-layer Llama whose rows (256) split into k-quant super-blocks, so the quantizer really uses them."""
    out = tmp_path_factory.mktemp("llama256")
    tok = transformers.AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    torch.manual_seed(0)
    config = tiny_llama_config(len(tok), hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_k_quants_come_from_llama_cpps_quantizer_and_load_in_llama_cpp(llama_256, tmp_path, monkeypatch):
    shim = tmp_path / "bin" / "llama-quantize"
    shim.parent.mkdir()
    shim.write_text(STAND_IN.format(root=ROOT, python=PEERS_PYTHON))
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}{os.pathsep}{os.environ['PATH']}")
    if kquants.quantizer() == "llama_cpp":
        pytest.skip("llama-cpp-python imports here: the PATH way is not taken")
    expected = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}  # the mix's main type, on the 256-wide rows
    files = {}
    for outtype in [*expected, "q4_0", "q4_1", "q5_0", "q5_1"]:
        files[outtype] = export(llama_256, tmp_path / f"llama256-{outtype}.gguf", outtype)
    for outtype, qtype in expected.items():
        types = {t.tensor_type for t in gguf.GGUFReader(files[outtype]).tensors}
        assert qtype in types, (outtype, types)
    sizes = {k: p.stat().st_size for k, p in files.items()}
    assert sizes["q4_k_m"] < sizes["q5_k_m"] < sizes["q6_k"]
    run = subprocess.run(
        [str(PEERS_PYTHON), "-c", LOAD_AND_ANSWER, *map(str, files.values())],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    answers = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(len(tokens) == 8 for tokens in answers.values()) and len(answers) == len(files)
