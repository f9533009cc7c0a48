"""The llama.cpp side of benchmarks/decode_speed.py, run with .venv-peers' python (llama-cpp-python lives there, not
in our environment). Reads a JSON job on stdin, prints one JSON line: per prompt, (tokens made, seconds). With
"lookup" in the job, llama.cpp drafts by prompt lookup (benchmarks/speculative.py)."""

import json
import sys
import time

from llama_cpp import Llama


def greedy(llm, ids, max_tokens):
    """(tokens made, seconds) for greedy decoding from the prompt ids, end-of-text included."""
    start, made = time.perf_counter(), 0
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        made += 1
        if made >= max_tokens or token == llm.token_eos():
            break
    return made, time.perf_counter() - start


def main():
    job = json.loads(sys.stdin.read())
    draft = {}
    if job.get("lookup"):  # llama-cpp-python's prompt-lookup speculation: [max n-gram, tokens drafted per step]
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        max_ngram, tokens = job["lookup"]
        draft = dict(draft_model=LlamaPromptLookupDecoding(max_ngram_size=max_ngram, num_pred_tokens=tokens))
    llm = Llama(model_path=job["model"], n_ctx=1024, n_threads=job["threads"], n_batch=512, verbose=False, **draft)
    greedy(llm, job["runs"][0][0], 2)  # warm-up: first-call allocations
    print(json.dumps([greedy(llm, ids, n) for ids, n in job["runs"]]))


if __name__ == "__main__":
    main()
