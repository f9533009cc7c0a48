"""The llama.cpp side of benchmarks/decode_speed.py, run with .venv-peers' python (llama-cpp-python lives there, not
in our environment). Reads a JSON job on stdin, prints one JSON line: per prompt, (tokens made, seconds). With
"lookup" in the job, llama.cpp drafts by prompt lookup (benchmarks/speculative.py). With "plain_buffers", no AMX or
repacked weight buffers (llama.cpp 0.3.36 dies in them with q8_0 on an AMX_INT8 CPU, as gguf_perplexity_peer.py says);
with "tokens", each run's token ids come after its seconds."""

import json
import sys
import time

import llama_cpp.llama_cpp as lc
from llama_cpp import Llama


def greedy(llm, ids, max_tokens, tokens=False):
    """(tokens made, seconds[, token ids]) for greedy decoding from the prompt ids, end-of-text included."""
    start, made = time.perf_counter(), []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        made.append(token)
        if len(made) >= max_tokens or token == llm.token_eos():
            break
    seconds = time.perf_counter() - start
    return (len(made), seconds, made) if tokens else (len(made), seconds)


def plain_buffers(default=lc.llama_model_default_params):
    params = default()
    params.use_extra_bufts = False
    return params


def main():
    job = json.loads(sys.stdin.read())
    draft = {}
    if job.get("lookup"):  # llama-cpp-python's prompt-lookup speculation: [max n-gram, tokens drafted per step]
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        max_ngram, tokens = job["lookup"]
        draft = dict(draft_model=LlamaPromptLookupDecoding(max_ngram_size=max_ngram, num_pred_tokens=tokens))
    if job.get("plain_buffers"):
        lc.llama_model_default_params = plain_buffers  # Llama() asks the module for its defaults
    llm = Llama(model_path=job["model"], n_ctx=1024, n_threads=job["threads"], n_batch=512, verbose=False, **draft)
    greedy(llm, job["runs"][0][0], 2)  # warm-up: first-call allocations
    print(json.dumps([greedy(llm, ids, n, job.get("tokens", False)) for ids, n in job["runs"]]))


if __name__ == "__main__":
    main()
