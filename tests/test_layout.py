"""The layout's rules, checked mechanically: few scripts at the root over one package, sizes, tests that mirror the
package, imports that only go down (scripts -> alpaca_trainml -> nothing upward), and no sys.path edits."""

import ast
import subprocess
import sys

import tomllib
from helpers import ROOT, subprocess_env

PACKAGE = ROOT / "alpaca_trainml"
MAX_ROOT_SCRIPTS = 10
MAX_MODULE_LINES = 400  # docs/STYLE.md aims at 300
MAX_FUNCTION_LINES = 80  # docs/STYLE.md aims at 50
# Modules whose tests live with the script they serve, under the script's name.
TESTED_WITH_THEIR_SCRIPT = {
    "data/alpaca_data.py": "test_utils.py",  # utils.py download_alpaca_data
    "generation/model.py": "test_inference.py",  # inference.py's InstructModel
    "generation/server.py": "test_serve.py",
    "self_instruct/generate.py": "test_generate_instruction.py",
    "training/arguments.py": "test_train.py",
    "training/sft.py": "test_train.py",
    "data/preference.py": "test_train_dpo.py",
    "training/dpo.py": "test_train_dpo.py",
    "training/dpo_arguments.py": "test_train_dpo.py",
    "evaluation/annotating.py": "test_evaluate.py",
    "evaluation/answering.py": "test_evaluate.py",
    "evaluation/report.py": "test_evaluate.py",
    "export/gguf.py": "test_export_gguf.py",
    "export/gguf_vocab.py": "test_export_gguf.py",
    "generation/hf_step.py": "test_llama_step.py",  # both model steps against transformers' generate()
    "generation/kv_cache.py": "test_llama_step.py",
    "checkpoints/adapters.py": "test_lora.py",  # adapter folders as train.py --use_peft saves them
    "data/alpaca_labels.py": "test_dataset.py",  # the golden labels
    "data/templates.py": "test_prompts.py",
    "data/ollama_template.py": "test_chat_prompts.py",  # run by Go, as Ollama runs it
    "evaluation/commands.py": "test_evaluate.py",  # evaluate.py's commands
    "export/command.py": "test_export_gguf.py",  # export_gguf.py's command line
    "generation/serve_command.py": "test_serve.py",  # serve.py's command line
}


def root_scripts():
    return sorted(p for p in ROOT.glob("*.py"))


def package_modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def project_files():
    """Every Python file of the project: the scripts, the package, the tests and the benchmarks."""
    return root_scripts() + package_modules() + sorted(ROOT.glob("tests/*.py")) + sorted(ROOT.glob("benchmarks/*.py"))


def rel(path):
    return str(path.relative_to(ROOT))


def test_at_most_10_python_files_at_the_root():
    names = [p.name for p in root_scripts()]
    assert len(names) <= MAX_ROOT_SCRIPTS, names


def test_no_module_over_400_lines():
    over = {rel(p): n for p in project_files() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert over == {}


def test_no_function_over_80_lines():
    over = {}
    for path in project_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    over[f"{rel(path)}:{node.lineno} {node.name}"] = lines
    assert over == {}


def imported_modules(path):
    """The top-level names of every module path imports (absolute imports; the package uses no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{rel(path)}: a relative import"
            names.add(node.module.split(".")[0])
    return names


def test_the_package_never_imports_a_root_script():
    scripts = {p.stem for p in root_scripts()}
    found = {rel(p): sorted(imported_modules(p) & scripts) for p in package_modules()}
    assert {k: v for k, v in found.items() if v} == {}


# The package's layers, lowest first: a module imports only from its own layer's modules (its own subpackage) and
# from lower layers. data/ knows no model code; checkpoints/ reads and writes folders; generation/ and export/ serve
# and ship them; self_instruct/ asks a model; training/ and evaluation/ drive the rest; loop/ (the `alpaca` command)
# runs them all.
LAYERS = [
    {"__init__", "cli", "jsonio"},
    {"precision", "models"},
    {"data"},
    {"checkpoints"},
    {"generation", "export"},
    {"self_instruct"},
    {"training", "evaluation"},
    {"loop"},
]


def package_imports(path):
    """The package's own parts (subpackage or top-level module) that the module at path imports."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "alpaca_trainml":
            names = node.module.split(".")[1:2] or [alias.name for alias in node.names]
            parts |= {name if name in set().union(*LAYERS) else "__init__" for name in names}
        elif isinstance(node, ast.Import):
            parts |= {a.name.split(".")[1] for a in node.names if a.name.startswith("alpaca_trainml.")}
    return parts


def test_imports_inside_the_package_only_point_down():
    layer = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    upward = {}
    for path in package_modules():
        rel_parts = path.relative_to(PACKAGE).parts
        own = rel_parts[0] if len(rel_parts) > 1 else path.stem
        assert own in layer, f"{rel(path)}: add its part to LAYERS"
        bad = sorted(p for p in package_imports(path) if p != own and layer[p] >= layer[own])
        if bad:
            upward[rel(path)] = bad
    assert upward == {}


def test_no_script_imports_another_script():
    scripts = {p.stem for p in root_scripts()}
    found = {p.name: sorted(imported_modules(p) & (scripts - {p.stem})) for p in root_scripts()}
    assert {k: v for k, v in found.items() if v} == {}


def test_tests_and_benchmarks_never_edit_sys_path():
    """The project is installed (pip install -e .); pytest's pythonpath holds only the tests' own helpers."""
    edits = []
    for path in sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                edits.append(f"{rel(path)}:{node.lineno}")
    assert edits == []
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["pythonpath"] == ["tests"]


def test_every_package_module_and_every_script_has_its_test_file():
    """tests/test_<module>.py (for a module in a sub-folder such as generation/routes/, test_<folder>.py also
    counts), or the script's test file named in TESTED_WITH_THEIR_SCRIPT."""
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    missing = []
    for path in package_modules():
        key = str(path.relative_to(PACKAGE))
        if path.name == "__init__.py":
            continue
        candidates = {f"test_{path.stem}.py", f"test_{path.parent.name}.py", TESTED_WITH_THEIR_SCRIPT.get(key)}
        if not candidates & tests:
            missing.append(key)
    missing += [p.name for p in root_scripts() if f"test_{p.stem}.py" not in tests]
    assert missing == []
    assert set(TESTED_WITH_THEIR_SCRIPT.values()) <= tests  # the map names files that exist


def test_every_script_answers_a_usage_error_through_cli():
    """Each script's entry point goes through cli.run or cli.run_fire: `script.py: error: ...` and exit status 2."""
    plain = [p.name for p in root_scripts() if "run(" not in p.read_text() and "run_fire(" not in p.read_text()]
    assert plain == []


def test_the_seeds_names_import_from_the_root_scripts_as_printed():
    """`python -c "from train import PROMPT_DICT, SupervisedDataset, train"`, and utils' names, in a fresh process."""
    code = "from train import PROMPT_DICT, SupervisedDataset, train; from utils import jload, jdump, PROMPT_DICT"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
