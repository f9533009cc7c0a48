"""The docs keep their promises: every shell command they show is run by a test or says what it needs, every page in
docs/ is reachable from README.md, and relative links lead to files that exist."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import ROOT, subprocess_env
from safetensors.torch import load_file

from train import missing_special_tokens, smart_tokenizer_and_embedding_resize

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages other work is writing; README.md may link them before they land.
RESERVED = {
    "docs/prompt-styles.md",
    "docs/architectures.md",
    "docs/loop.md",
    "docs/operators.md",
    "docs/faster-decoding.md",
}
MARKERS = ("needs a GPU", "needs the network")
SHELL_BLOCK = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```", re.S | re.M)
ANY_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

# Commands the docs show, run as printed by test_documented_commands_run_as_printed (keep the two in step).
DOCUMENTED_COMMANDS = [
    'python inference.py --model_name_or_path out/demo --instruction "Name three primary colours."',
    "python deploy_endpoint.py --checkpoint alpaca --dry-run",
    "python export_gguf.py out/demo out/demo-f32.gguf",
    "python export_gguf.py out/demo out/demo-q8_0.gguf --outtype q8_0",
    "python -m alpaca_trainml.data.chat_template install out/demo",
    "python -m alpaca_trainml.data.chat_template print > alpaca.jinja",
    "python evaluate.py generate --model_name_or_path out/demo --eval_set data/sample_eval.json "
    "--output out/eval/demo.json",
    "python weight_diff.py make_diff --path_raw llama-7b --path_tuned out/demo --path_diff out/demo-diff",
    "python weight_diff.py recover --path_raw llama-7b --path_diff out/demo-diff --path_tuned out/recovered",
]


def split_comment(line):
    """(command, comment) of one shell line: a '#' outside quotes, at the start or after a space, starts the comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1 :].strip()
    return line.strip(), ""


def shell_commands(text):
    """Every command in the shell blocks of a markdown text: `\\` continuations joined, one command a line; in a
    console block only the lines after a `$ ` prompt."""
    commands = []
    for kind, body in SHELL_BLOCK.findall(text):
        lines = body.splitlines()
        if kind == "console":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        pending = ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command, comment = split_comment(pending + line)
            pending = ""
            if command:
                commands.append((" ".join(command.split()), comment))
    return commands


def test_shell_commands_are_split_joined_and_marked():
    text = (
        "```bash\nmake fresh  # fine-tunes; the first run needs the network\n# a comment alone\n"
        "deepspeed --num_gpus 4 train.py \\\n    --bf16 True  # needs a GPU\n"
        "python serve.py --api_key 'a#b'\n```\n```console\n$ python train.py --help\nusage: train.py\n```\n"
        "```text\nnot a command\n```\n"
    )
    assert shell_commands(text) == [
        ("make fresh", "fine-tunes; the first run needs the network"),
        ("deepspeed --num_gpus 4 train.py --bf16 True", "needs a GPU"),
        ("python serve.py --api_key 'a#b'", ""),
        ("python train.py --help", ""),
    ]


def tested_strings():
    """The set of every string constant in tests/*.py, whitespace (and `\\` line continuations) collapsed."""
    strings = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(" ".join(node.value.replace("\\\n", " ").split()))
    return strings


def is_run_by_a_test(command, strings):
    return command in strings  # the whole string: a command inside a docstring or a longer command does not count


def test_every_documented_command_is_tested_or_says_what_it_needs():
    strings = tested_strings()
    unrun = [
        f"{doc.relative_to(ROOT)}: {command}"
        for doc in DOCS
        for command, comment in shell_commands(doc.read_text())
        if not comment.endswith(MARKERS) and not is_run_by_a_test(command, strings)
    ]
    assert not unrun, (
        "shell commands in the docs that no test runs; run them in a test (verbatim), or end the line with "
        "`# needs a GPU` or `# needs the network`:\n" + "\n".join(unrun)
    )


def relative_links(doc):
    """(target file, as written) for every relative link of a page, code blocks left out and anchors dropped."""
    text = ANY_BLOCK.sub("", doc.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, mailto:, or an anchor on the same page
        yield (doc.parent / target.split("#")[0]).resolve(), target


def test_relative_links_resolve():
    broken = [
        f"{doc.relative_to(ROOT)}: {written}"
        for doc in DOCS
        for path, written in relative_links(doc)
        if not path.exists() and path.relative_to(ROOT).as_posix() not in RESERVED
    ]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {path for path, _ in relative_links(ROOT / "README.md")}
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert not pages - linked, f"docs pages README.md does not link: {sorted(p.name for p in pages - linked)}"
    assert {ROOT / name for name in RESERVED} <= linked  # the pages being written are in the table already


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail to a page in docs/"
    # dated runs belong in benchmarks/RESULTS.md, not in the README
    dated = [line for line in lines if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert not dated, dated


def scratch_checkout(tmp_path, base_dir):
    """A folder laid out like a checkout after `make demo`: the repo's scripts and data, llama-7b (here the tiny
    Llama) and out/demo, the tiny Llama as train.py would fine-tune it ([PAD] added with the mean resize, every weight
    nudged)."""
    for path in ROOT.iterdir():
        if path.suffix == ".py" or path.name in {"data", "configs", "front-end", "prompt.txt", "seed_tasks.jsonl"}:
            (tmp_path / path.name).symlink_to(path)
    (tmp_path / "llama-7b").symlink_to(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    smart_tokenizer_and_embedding_resize(missing_special_tokens(tok), tok, model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(tmp_path / "out" / "demo")
    tok.save_pretrained(tmp_path / "out" / "demo")
    return tmp_path


@pytest.mark.slow
def test_documented_commands_run_as_printed(tmp_path, tiny_llama_dir):
    work = scratch_checkout(tmp_path, tiny_llama_dir)
    env = subprocess_env(PATH=f"{Path(sys.executable).parent}:{subprocess_env()['PATH']}")
    for command in DOCUMENTED_COMMANDS:
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert (work / "out" / "demo-f32.gguf").stat().st_size > 0 and (work / "out" / "demo-q8_0.gguf").stat().st_size > 0
    assert "### Response:" in (work / "alpaca.jinja").read_text()
    answers = json.loads((work / "out" / "eval" / "demo.json").read_text())
    assert len(answers) == 30  # data/sample_eval.json's 30 held-out rows
    recovered = load_file(next((work / "out" / "recovered").glob("*.safetensors")))
    tuned = load_file(next((work / "out" / "demo").glob("*.safetensors")))
    assert recovered.keys() == tuned.keys()
    for key, tensor in tuned.items():  # (tuned - raw) + raw: equal up to fp32 rounding, as in test_weight_diff.py
        assert torch.allclose(recovered[key], tensor, atol=1e-6, rtol=0), key
