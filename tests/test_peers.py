"""The peers benchmarks on tiny inputs: TRL and train.py train the same tokens to the same held-out loss, and
evaluate.py and alpaca_eval give the same win rate on the same judgments. They need .venv-peers (`make peers`)."""

import json
import re
import shutil
import subprocess
import sys

import helpers
import pytest
from helpers import ROOT, subprocess_env

PEERS = ROOT / ".venv-peers" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not PEERS.exists(), reason="no .venv-peers: `make peers` installs TRL and alpaca_eval there"
)


def run(module, *args, timeout=900):
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.fixture
def tiny_model_with_pad(tiny_llama_dir, tmp_path):
    """The tiny Llama with a pad token (its EOS, as in SmolLM2), so train.py adds no token: one model for both."""
    import transformers

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_llama_dir, folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_trl_and_train_py_train_the_same_tokens_to_the_same_loss(tiny_model_with_pad, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(helpers.make_rows(20, seed=3)))
    lines = run(
        "benchmarks.peers_training",
        *("--model", tiny_model_with_pad, "--data_path", data, "--steps", 2, "--batch_size", 4, "--eval_rows", 4),
        *("--configs", "full,lora", "--dtypes", "fp32", "--work_dir", tmp_path / "work"),
    )
    text = "\n".join(lines)
    # TRL's padding-free batch has no attention mask: with the KV cache on (a plain forward) its examples see each
    # other; without it (as SFTTrainer trains) transformers builds a block-diagonal mask from position_ids
    diffs = {k: float(v) for k, v in re.findall(r"'(\w+, use_cache=\w+)': ([\d.e-]+)", text)}
    assert len(diffs) == 4, text
    assert all((v > 1e-3) == k.endswith("use_cache=True") for k, v in diffs.items()), diffs
    assert "exact TRL modes: ['padded', 'padding_free']" in text
    for config in ("full-fp32", "lora-fp32"):
        block = text.split(f"\n{config}:")[1]
        assert "supervised tokens per step: trl-padded equal" in block
        assert "supervised tokens per step: trl-padding_free equal" in block
        # the same tokens, the same steps, both exact: the held-out losses agree far inside the 1% the issue asks
        loss = float(re.search(r"ours / trl-[\w_]+: .* eval loss ([+-][\d.]+)%", block).group(1))
        assert abs(loss) < 0.1, block
    assert re.fullmatch(r"peers_training: ours/TRL tokens/s full-fp32 [\d.]+ lora-fp32 [\d.]+", lines[-1])


@pytest.mark.slow
def test_evaluate_and_alpaca_eval_give_the_same_win_rate(tmp_path):
    lines = run("benchmarks.peers_judging", "--work_dir", tmp_path)
    assert "pairs judged differently: 0" in lines
    rates = re.search(r"win rate evaluate.py ([\d.]+) alpaca_eval ([\d.]+) \(equal\)", lines[-1])
    assert rates and rates.group(1) == rates.group(2), lines[-1]
    ours = json.loads((tmp_path / "ours" / "annotations.json").read_text())
    assert len(ours) == 30 and {a["status"] for a in ours} <= {"judged", "identical"}  # data/sample_eval.json: 30
