"""The one rule of prompt styles (data/prompts.py), end to end: for any checkpoint, the prompt serve.py builds for a
chat is the one `apply_chat_template(messages, add_generation_prompt=True)` of the *saved* checkpoint builds, and its
greedy answer is transformers' on that prompt. Both styles; multi-turn chats with and without a system message; a
full checkpoint, a LoRA adapter folder and train_dpo.py's output. The GGUF file and the Ollama Modelfile carry the
same template and stop tokens; with `go` on PATH, the Modelfile's Go template is executed and gives the same text."""

import json
import shutil
import subprocess

import gguf
import pytest
import torch
import transformers
from helpers import load_tokenizer, tiny_llama_config
from test_serve import call
from test_train_dpo import dpo_argv, sharegpt_pairs

import train_dpo
from alpaca_trainml.data import prompts
from alpaca_trainml.export.gguf import export
from alpaca_trainml.generation.model import InstructModel
from alpaca_trainml.generation.server import create_app

# ChatML with a default system block, as SmolLM2's: the end of turn (<|im_end|>) is not the tokenizer's EOS
CHATML = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Count the words."}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Give a one-word title."},
    ],
    [
        {"role": "user", "content": "Summarize the text."},
        {"role": "assistant", "content": "The river counts three apples."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Shorter, please."}]},
    ],
]


def text_only(chat):
    """The chat with content parts joined, as serve.py reads them and apply_chat_template is given them."""
    return [dict(m, content=join_parts(m["content"])) for m in chat]


def join_parts(content):
    return "".join(p["text"] for p in content) if isinstance(content, list) else content


def save_checkpoint(bpe_tokenizer_dir, out, style, seed=0):
    tok = load_tokenizer(bpe_tokenizer_dir, max_length=256)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    prompts.get_style(style).install(tok)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config(len(tok), eos_token_id=tok.eos_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoints(bpe_tokenizer_dir, tmp_path_factory):
    """{kind: folder}: full checkpoints of both styles, a LoRA adapter on the model-style one, and DPO's output."""
    tmp = tmp_path_factory.mktemp("styles")
    out = {style: save_checkpoint(bpe_tokenizer_dir, tmp / style, style) for style in ("alpaca", "model")}
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(out["model"])
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp / "adapter")
    transformers.AutoTokenizer.from_pretrained(out["model"]).save_pretrained(tmp / "adapter")
    out["adapter"] = tmp / "adapter"
    (tmp / "pairs.json").write_text(json.dumps(sharegpt_pairs(4)))
    argv = dpo_argv(out["model"], tmp / "pairs.json", tmp / "dpo", "--max_steps", "1", "--learning_rate", "1e-3")
    train_dpo.train_dpo(argv)
    out["dpo"] = tmp / "dpo"
    return out


def transformers_greedy(folder, ids, stops, n=8):
    """transformers' greedy tokens on ids, up to and without the first stop token."""
    path = folder
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), folder)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stops)[0, len(ids) :]
    new = out.tolist()
    return new[: next((i for i, t in enumerate(new) if t in stops), len(new))]


@pytest.mark.parametrize("kind", ["alpaca", "model", "adapter", "dpo"])
def test_serve_prompts_a_chat_with_the_saved_template_and_answers_as_transformers(checkpoints, kind):
    folder = checkpoints[kind]
    saved = transformers.AutoTokenizer.from_pretrained(folder)  # the saved checkpoint, as vLLM would read it
    model = InstructModel(str(folder))
    assert model.prompt_style.name == ("alpaca" if kind == "alpaca" else "model")  # DPO kept the checkpoint's
    app = create_app(model, served_model_name="m")
    bodies = [dict(json={"messages": c, "max_tokens": 8, "temperature": 0}) for c in CHATS]
    answers = call(app, *[("POST", "/v1/chat/completions", b) for b in bodies])
    for chat, r in zip(CHATS, answers):
        assert r.status_code == 200, r.text
        ids = saved.apply_chat_template(text_only(chat), add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = ids["input_ids"]
        assert r.json()["usage"]["prompt_tokens"] == len(ids), chat
        assert model.encode_chat(text_only(chat)) == ids
        greedy = transformers_greedy(folder, ids, model.eos_ids)
        want = saved.decode(greedy, skip_special_tokens=True).strip()
        assert r.json()["choices"][0]["message"]["content"] == want, chat


def test_the_model_style_stops_at_its_end_of_turn_token(checkpoints):
    tok = transformers.AutoTokenizer.from_pretrained(checkpoints["model"])
    style = prompts.get_style("model")
    assert style.end_of_turn(tok) == "<|im_end|>" != tok.eos_token
    assert InstructModel(str(checkpoints["model"])).eos_ids == sorted(
        {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    )
    assert prompts.ALPACA.end_of_turn(tok) == tok.eos_token


@pytest.mark.parametrize("role", ["tool", "function", "robot"])
def test_a_role_the_style_cannot_take_is_a_400_naming_it(checkpoints, role):
    app = create_app(InstructModel(str(checkpoints["model"])), served_model_name="m")
    chat = [{"role": role, "content": "x"}, {"role": "user", "content": "Hi"}]
    (r,) = call(app, ("POST", "/v1/chat/completions", dict(json={"messages": chat})))
    message = r.json()["error"]["message"]  # the request model lists the roles (api_schema: the schema says them)
    assert (
        r.status_code == 400 and "messages.0.role: Input should be 'system'" in message and f"(got '{role}')" in message
    )


def gguf_field(reader, key):
    f = reader.get_field(key)
    return f.contents() if f is not None else None


@pytest.mark.parametrize("kind", ["alpaca", "model", "adapter"])
def test_the_gguf_file_and_modelfile_carry_the_checkpoints_template_and_stops(checkpoints, kind, tmp_path):
    folder = checkpoints[kind]
    out = export(folder, tmp_path / "m.gguf", "f32", modelfile_path=tmp_path / "Modelfile")
    saved = transformers.AutoTokenizer.from_pretrained(folder)
    reader = gguf.GGUFReader(out)
    assert gguf_field(reader, "tokenizer.chat_template") == saved.chat_template
    style = prompts.load_style(saved, folder)
    end = saved.convert_tokens_to_ids(style.end_of_turn(saved))
    assert gguf_field(reader, "tokenizer.ggml.eot_token_id") == end
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./m.gguf\nTEMPLATE """')
    assert f'PARAMETER stop "{style.end_of_turn(saved)}"' in modelfile


GO_PROGRAM = """package main

import (
\t"encoding/json"
\t"os"
\t"text/template"
)

type Message struct {
\tRole    string `json:"role"`
\tContent string `json:"content"`
}

func main() {
\tsrc, _ := os.ReadFile(os.Args[1])
\tvar chats [][]Message
\tjson.NewDecoder(os.Stdin).Decode(&chats)
\tt := template.Must(template.New("m").Parse(string(src)))
\tvar out []string
\tfor _, chat := range chats {
\t\tvar b []byte
\t\tw := &buf{&b}
\t\tif err := t.Execute(w, map[string]any{"Messages": chat}); err != nil {
\t\t\tpanic(err)
\t\t}
\t\tout = append(out, string(b))
\t}
\tjson.NewEncoder(os.Stdout).Encode(out)
}

type buf struct{ b *[]byte }

func (w *buf) Write(p []byte) (int, error) { *w.b = append(*w.b, p...); return len(p), nil }
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """A function (Go template text, chats) -> texts, through Go's text/template, as Ollama runs a Modelfile's."""
    if shutil.which("go") is None:
        pytest.skip("needs Go (apt-get install golang-go) to run Ollama's templates")
    tmp = tmp_path_factory.mktemp("go")
    (tmp / "main.go").write_text(GO_PROGRAM)
    env = {
        "GOCACHE": str(tmp / "cache"),
        "HOME": str(tmp),
        "PATH": "/usr/bin:/bin:/usr/local/bin",
        "GO111MODULE": "off",
    }
    build = subprocess.run(
        ["go", "build", "-o", str(tmp / "render"), str(tmp / "main.go")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert build.returncode == 0, build.stderr[-2000:]

    def render(template, chats):
        (tmp / "template").write_text(template)
        run = subprocess.run(
            [str(tmp / "render"), str(tmp / "template")],
            input=json.dumps(chats),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout)

    return render


@pytest.mark.parametrize("style", ["alpaca", "model"])
def test_the_ollama_template_renders_as_the_jinja_template(checkpoints, style, go_render):
    tok = transformers.AutoTokenizer.from_pretrained(checkpoints[style])
    chats = [text_only(c) for c in CHATS]
    for chat, text in zip(chats, go_render(prompts.get_style(style).ollama_template(tok), chats)):
        assert text == prompts.get_style(style).render(tok, chat), chat


LLAMA_CPP_CHATS = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=2, verbose=False)
out = []
for chat in json.loads(sys.stdin.read()):
    r = llm.create_chat_completion(chat, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=24)
    out.append(dict(text=r["choices"][0]["message"]["content"], prompt_tokens=r["usage"]["prompt_tokens"]))
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("style", ["alpaca", "model"])
def test_llama_cpp_answers_chats_on_the_exported_file_as_serve_py(style, tmp_path):
    """The embedded model saved as a checkpoint of each style, exported, and asked 4 chats by llama.cpp's chat API
    (the GGUF's template): the same prompt length and greedy answer as serve.py's prompt (fp32)."""
    from test_export_gguf import PEERS_PYTHON, peers_have_llama_cpp

    from alpaca_trainml.generation.decoding import GenParams
    from alpaca_trainml.models import embedded_model_path

    if not peers_have_llama_cpp():
        pytest.skip("needs .venv-peers with llama-cpp-python (make peers)")
    folder = tmp_path / style
    shutil.copytree(embedded_model_path(), folder)
    prompts.get_style(style).install(transformers.AutoTokenizer.from_pretrained(folder)).save_pretrained(folder)
    out = export(folder, tmp_path / "m.gguf", "f32")
    model = InstructModel(str(folder))
    chats = [text_only(c) for c in CHATS if not any(m["role"] == "developer" for m in c)]
    ours = []
    for chat in chats:
        ids = model.encode_chat(chat)
        ours.append((len(ids), model.generate([ids], GenParams(max_tokens=24, temperature=0))[0].text.strip()))
    run = subprocess.run(
        [str(PEERS_PYTHON), "-c", LLAMA_CPP_CHATS, str(out)],
        input=json.dumps(chats),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    assert [(t["prompt_tokens"], t["text"].strip()) for t in theirs] == ours
