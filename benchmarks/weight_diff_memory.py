"""Peak RSS and wall time of weight_diff.make_diff and .recover, and of the original recover, on a 538 MB fp32 model.

    python -m benchmarks.weight_diff_memory
    python -m benchmarks.weight_diff_memory --workdir /tmp/wd_bench   # keep the folders; reuse raw and tuned

The raw model is the embedded SmolLM2-135M (utils.resolve_model_path, fp32); the "tuned" one is it
after train.py's special-token resize with every weight nudged. Each step runs in its own
subprocess and its peak RSS comes from os.wait4 on that child alone, so no two peaks mix; a sampled
peak RssAnon (allocated memory, without mapped file pages) comes with it. A child that only imports
the same modules gives the interpreter + torch + transformers baseline; we print both the raw peaks
and the peaks above that baseline. The original algorithm is restated as it
worked: both models loaded with from_pretrained in fp32, the resize on raw, diff + raw, then saved.
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from math import prod
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = "import sys, torch, transformers, weight_diff, train, utils\n"
BUILD_TUNED = (
    PRELUDE
    + """
raw, out = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
tok = transformers.AutoTokenizer.from_pretrained(raw)
train.smart_tokenizer_and_embedding_resize(train.missing_special_tokens(tok), tok, model)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in model.parameters():  # a fine-tune's worth of change: 1e-3 against weights of about 0.05
        p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
model.save_pretrained(out)
tok.save_pretrained(out)
"""
)
MAKE_DIFF = PRELUDE + "weight_diff.make_diff(sys.argv[1], sys.argv[2], sys.argv[3])\n"
OURS = PRELUDE + "weight_diff.recover(sys.argv[1], sys.argv[2], sys.argv[3], test_inference=False)\n"
# The original recover(), minus its test generation; as there, the diff is loaded as a model.
ORIGINAL = (
    PRELUDE
    + """
path_raw, path_diff, path_tuned = sys.argv[1:4]
model_raw = transformers.AutoModelForCausalLM.from_pretrained(path_raw, dtype=torch.float32)
model_recovered = transformers.AutoModelForCausalLM.from_pretrained(path_diff, dtype=torch.float32)
tokenizer_raw = transformers.AutoTokenizer.from_pretrained(path_raw)
# the tokens train.py added (the original hard-coded [PAD], which is the same set for LLaMA)
train.smart_tokenizer_and_embedding_resize(train.missing_special_tokens(tokenizer_raw), tokenizer_raw, model_raw)
state_raw, seen = model_raw.state_dict(), set()
for key, tensor in model_recovered.state_dict().items():
    if tensor.data_ptr() not in seen:  # tied embeddings appear twice; the original would add raw twice
        seen.add(tensor.data_ptr())
        tensor.add_(state_raw[key])
model_recovered.save_pretrained(path_tuned)
transformers.AutoTokenizer.from_pretrained(path_diff).save_pretrained(path_tuned)
"""
)


def anon_kib(pid):
    """RssAnon of a live process in KiB: memory it allocated, without the file pages it has mapped."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def measure(name, code, *args):
    """Run `code` in a fresh interpreter: (peak RSS, peak RssAnon sampled every 20 ms, in bytes; wall seconds).

    The peak RSS is the kernel's, of that child alone. It counts file pages the child has mapped (safetensors
    are read through mmap), so we also sample RssAnon, the memory the child itself allocated."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env)
    peak_anon, done = [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            with contextlib.suppress(OSError, StopIteration, ValueError):  # the child may exit between samples
                peak_anon[0] = max(peak_anon[0], anon_kib(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
    if child.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {child.returncode}")
    peak = usage.ru_maxrss * 1024  # Linux reports kilobytes
    print(
        f"{name}: peak RSS {peak / 2**20:.0f} MiB, peak RssAnon {peak_anon[0] / 2**10:.0f} MiB, wall {wall:.1f} s",
        flush=True,
    )
    return peak, peak_anon[0] * 1024, wall


def weights_bytes(folder):
    """Bytes of fp32 weights in a folder we wrote (from its safetensors headers, not file sizes)."""
    from safetensors import safe_open

    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                total += 4 * prod(shape)  # prod(()) == 1 for a 0-dim tensor
    return total


def plain_copy(src, dst):
    """Hard links to the converted embedded model (utils has already dropped its GGUF quantization_config)."""
    dst.mkdir(parents=True)
    for path in Path(src).iterdir():
        if path.is_file():
            os.link(path, dst / path.name)  # read-only use: a hard link saves 538 MB of copying


def max_abs_difference(a, b):
    from safetensors.torch import load_file

    load = lambda d: {k: v for p in Path(d).glob("*.safetensors") for k, v in load_file(p).items()}  # noqa: E731
    left, right = load(a), load(b)
    if left.keys() != right.keys():
        raise SystemExit(f"the two recoveries hold different tensors: {sorted(left.keys() ^ right.keys())[:5]}")
    return max((left[k] - right[k]).abs().max().item() for k in left)


def main(args):
    import utils

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wd_bench."))
    try:
        raw, tuned, diff, ours, orig = (
            work / n for n in ("raw", "tuned", "diff", "recovered_ours", "recovered_original")
        )
        if not (raw / "config.json").exists():
            plain_copy(utils.resolve_model_path(None), raw)
        for folder in (ours, orig):
            shutil.rmtree(folder, ignore_errors=True)
        if not (tuned / "config.json").exists():
            measure("setup: build the tuned model", BUILD_TUNED, raw, tuned)
        shutil.rmtree(diff, ignore_errors=True)
        runs = {
            "baseline": measure("baseline: interpreter + imports only", PRELUDE),
            "make_diff ours": measure("make_diff (ours, streamed)", MAKE_DIFF, raw, tuned, diff),
            "recover ours": measure("recover (ours, streamed)", OURS, raw, diff, ours),
            "recover original": measure("recover (original algorithm)", ORIGINAL, raw, diff, orig),
        }
        size = weights_bytes(ours)
        print(f"model size: {size / 2**20:.0f} MiB of fp32 weights")
        print(f"max |ours - original| over all weights: {max_abs_difference(ours, orig):.3g}")
        base_peak, base_anon, base_wall = runs.pop("baseline")
        for name, (peak, anon, wall) in runs.items():
            print(
                json.dumps(
                    {
                        "run": name,
                        "peak_rss_mib": round(peak / 2**20),
                        "wall_s": round(wall, 1),
                        "peak_over_model_size": round(peak / size, 3),
                        "peak_above_baseline_over_model_size": round((peak - base_peak) / size, 3),
                        "peak_anon_above_baseline_over_model_size": round((anon - base_anon) / size, 3),
                        "wall_above_baseline_s": round(wall - base_wall, 1),
                    }
                )
            )
        ours_peak, orig_peak = runs["recover ours"][0], runs["recover original"][0]
        print(
            f"recover peak RSS above the import baseline / model size: ours "
            f"{(ours_peak - base_peak) / size:.3f}, original {(orig_peak - base_peak) / size:.3f}"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        help="keep the folders here instead of a temp folder; the raw and tuned models are reused on the next run, "
        "the diff and recoveries are made again",
    )
    main(parser.parse_args())
