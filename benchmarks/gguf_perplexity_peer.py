"""The llama.cpp side of benchmarks/gguf_quants.py, run with .venv-peers' python (llama-cpp-python lives there). Reads
a JSON job on stdin (model, text, n_ctx, chunks, threads), prints one JSON line: perplexity and tokens scored.

Each chunk of n_ctx tokens is evaluated from an empty cache and every token after the chunk's first is scored (the
mean negative log-likelihood of the next token over all chunks, exponentiated)."""

import json
import sys

import llama_cpp.llama_cpp as lc
import numpy as np

_default_params = lc.llama_model_default_params


def _plain_buffers():
    """No AMX or repacked weight buffers: llama.cpp 0.3.36 dies in them (SIGILL) with q4_0, q4_1 and the k-quants on
    an AMX_INT8 CPU (measured 2026-12-05); the plain CPU buffers compute the same numbers."""
    params = _default_params()
    params.use_extra_bufts = False
    return params


def main():
    job = json.loads(sys.stdin.read())
    if not job.get("extra_buffers"):
        lc.llama_model_default_params = _plain_buffers
    from llama_cpp import Llama

    n_ctx = job["n_ctx"]
    llm = Llama(
        model_path=job["model"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=job["threads"], logits_all=True, verbose=False
    )
    tokens = llm.tokenize(job["text"].encode(), add_bos=False, special=False)
    nll, scored = 0.0, 0
    for start in range(0, min(len(tokens) // n_ctx, job["chunks"]) * n_ctx, n_ctx):
        chunk = tokens[start : start + n_ctx]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        scored += len(chunk) - 1
    print(json.dumps(dict(perplexity=float(np.exp(nll / scored)), tokens=scored)))


if __name__ == "__main__":
    main()
