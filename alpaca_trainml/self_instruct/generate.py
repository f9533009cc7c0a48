"""The Self-Instruct run behind generate_instruction.py: keep up to max_workers requests in flight, filter each answer
as it lands (the original's filters, then the ROUGE-L dedup) and save regen.json after each, atomically.
"""

import json
import logging
import random
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from alpaca_trainml import jsonio
from alpaca_trainml.cli import UsageError, check_flags, integer, number
from alpaca_trainml.generation import limits
from alpaca_trainml.self_instruct import api_client
from alpaca_trainml.self_instruct.api_client import FatalRequestError, choose_api, make_client, uses_gpt2_tokenizer
from alpaca_trainml.self_instruct.prompting import (
    NUM_PROMPT_TASKS,
    SEED_TASKS_PATH,
    STOP_SEQUENCES,
    encode_prompt,
    load_seed_tasks,
    parse_response,
    record_rejection_reason,
    strip_chat_echo,
)
from alpaca_trainml.self_instruct.rouge_dedup import RougeLDeduper, similarity_fields

logger = logging.getLogger(__name__)
DEFAULT_MODEL = "gpt-4o-mini"  # the original's text-davinci-003 is retired; a current, cheap OpenAI chat model
MAX_TOKENS = 3072  # as the original (--max_tokens); shrunk by 20% at a time on context-length errors


class Requester(api_client.Requester):
    """api_client's Requester with the original's decoding: n=1, stop before task 20, and for GPT-2/GPT-3 vocabulary
    models no <|endoftext|>; a chat answer loses the task header it restates."""

    def __init__(self, client, api, model_name, num_prompt_instructions, temperature=1.0, top_p=1.0, **kw):
        # as the original: never emit <|endoftext|> (token 50256 in the GPT-2/GPT-3 vocabularies only)
        bias = {"50256": -100} if uses_gpt2_tokenizer(model_name) else None
        kw.setdefault("max_tokens", MAX_TOKENS)
        super().__init__(
            client,
            api,
            model_name,
            logit_bias=bias,
            temperature=temperature,
            top_p=top_p,
            n=1,
            stop=STOP_SEQUENCES,
            **kw,
        )
        self.k = num_prompt_instructions

    def chat_text(self, text):
        return strip_chat_echo(text, self.k)


def load_regen(path):
    """Records of an earlier run, to resume from. Errors name the file."""
    if not path.exists():
        return []
    try:
        records = jsonio.jload(path)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e}); move it away to start over") from e
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("instruction"), str) for r in records
    ):
        raise UsageError(f"{path}: expected a list of records with an 'instruction' string; move it away to start over")
    return records


def add_response(candidates, deduper, records, stats):
    """Apply the original's filters and the scaffolding filter, then the ROUGE-L dedup, to one answer's records;
    append the kept ones."""
    valid = []
    for rec in candidates:
        reason = record_rejection_reason(rec)
        stats[f"dropped_{reason}" if reason else "passed_filters"] += 1
        if not reason:
            valid.append(rec)
    for rec, (keep, scores) in zip(valid, deduper.filter_batch([r["instruction"] for r in valid])):
        stats["kept" if keep else "dropped_similar"] += 1
        if keep:
            records.append({**rec, **similarity_fields(scores, deduper.instructions)})


def check_options(api, model_name, n_seeds, num_prompt_instructions, **values):
    """The API to use; UsageError listing every bad option. values: the numeric flags, by name."""
    problems, chosen = [], None
    if not isinstance(model_name, str) or not model_name:
        problems.append(f"--model_name {model_name!r}: expected a model name")
    else:
        try:
            chosen = choose_api(api, model_name)
        except ValueError as e:
            problems.append(str(e))
    most = min(n_seeds, NUM_PROMPT_TASKS - 2)  # the model stops at task 20, so at most 18 examples leave room
    checks = [
        (
            "num_prompt_instructions",
            num_prompt_instructions,
            integer(num_prompt_instructions, 1, most),
            f"1..{most} (there are {n_seeds} seed tasks and the model stops at task {NUM_PROMPT_TASKS})",
        ),
        *limits.flag_checks(values["temperature"], values["top_p"]),
        ("request_timeout", values["request_timeout"], number(values["request_timeout"], 0.001), "seconds above 0"),
        ("retry_base_s", values["retry_base_s"], number(values["retry_base_s"], 0), "seconds, at least 0"),
        ("max_retries", values["max_retries"], integer(values["max_retries"], 0), "an integer of at least 0"),
    ]
    for flag in ("max_workers", "request_batch_size", "max_tokens", "num_cpus", "num_instructions_to_generate"):
        checks.append((flag, values[flag], integer(values[flag], 1), "an integer of at least 1"))
    check_flags(checks, problems)
    return chosen


def generate_instruction_following_data(
    output_dir="./",
    seed_tasks_path=SEED_TASKS_PATH,
    num_instructions_to_generate=100,
    model_name=DEFAULT_MODEL,
    num_prompt_instructions=3,
    request_batch_size=5,
    temperature=1.0,
    top_p=1.0,
    num_cpus=16,
    api="auto",
    base_url=None,
    api_key=None,
    max_workers=4,
    request_timeout=120.0,
    max_retries=6,
    retry_base_s=1.0,
    export_alpaca=None,
    seed=None,
    max_tokens=MAX_TOKENS,
):
    """Generate instructions until output_dir/regen.json holds num_instructions_to_generate of them.

    request_batch_size: prompts per completions request (chat sends one prompt per request). num_cpus: threads for the
    dedup's LCS matrix. seed: seeds the choice of example tasks (the original did not seed). max_tokens: the most
    new tokens a request may ask for (prompt plus max_tokens must fit the model's context window)."""
    seeds = load_seed_tasks(seed_tasks_path)
    numeric = dict(temperature=temperature, top_p=top_p, request_timeout=request_timeout, retry_base_s=retry_base_s)
    numeric.update(max_retries=max_retries, max_workers=max_workers, request_batch_size=request_batch_size)
    numeric.update(max_tokens=max_tokens, num_cpus=num_cpus, num_instructions_to_generate=num_instructions_to_generate)
    chosen = check_options(api, model_name, len(seeds), num_prompt_instructions, **numeric)
    client, base_url = make_client(base_url, api_key, request_timeout)
    requester = Requester(
        client,
        chosen,
        model_name,
        num_prompt_instructions,
        temperature,
        top_p,
        auto=api == "auto",
        max_retries=max_retries,
        retry_base_s=retry_base_s,
        max_tokens=max_tokens,
    )
    regen_path = Path(output_dir) / "regen.json"
    records = load_regen(regen_path)
    deduper = RougeLDeduper([s["instruction"] for s in seeds] + [r["instruction"] for r in records], workers=num_cpus)
    where = base_url or "api.openai.com"
    logger.info(
        "%d seed tasks, %d instructions from an earlier run; %s API, model %s at %s",
        len(seeds),
        len(records),
        chosen,
        model_name,
        where,
    )
    rng = random.Random(seed)

    def make_prompts():
        size = request_batch_size if requester.api == "completions" else 1
        return [encode_prompt(rng.sample(seeds, num_prompt_instructions)) for _ in range(size)]

    stats, seconds = run_requests(
        requester, make_prompts, records, deduper, regen_path, num_instructions_to_generate, max_workers
    )
    log_run(stats, seconds, requester.retries, len(records), regen_path)
    if export_alpaca:
        export_alpaca_rows(records, export_alpaca)
    return str(regen_path)


def log_run(stats, seconds, retries, n_records, regen_path):
    """The run's one summary line: requests, seconds each, tokens, and what was kept and dropped."""
    drops = drop_counts(stats)
    logger.info(
        "done: %d requests (%.2f s each on average, %d retries), %d tokens; kept %d, dropped %d (%s); %d in %s",
        stats["requests"],
        float(np.mean(seconds)) if seconds else 0.0,
        retries,
        stats["tokens"],
        stats["kept"],
        sum(drops.values()),
        ", ".join(f"{k} {v}" for k, v in drops.items()) or "none",
        n_records,
        regen_path,
    )


def run_requests(requester, make_prompts, records, deduper, regen_path, target, max_workers):
    """Send requests until records holds target instructions; filter each answer as it lands and save after each.

    Returns (stats Counter, seconds per request).
    A FatalRequestError ends the run with a message; what is saved stays."""
    stats, seconds = Counter(), []

    def one_request(prompts):
        start = time.perf_counter()
        results, usage = requester(prompts)
        return prompts, results, usage, time.perf_counter() - start

    bar = tqdm.tqdm(total=target, initial=min(len(records), target), unit="instr")
    # the bar closes (its line ends) before an error is printed, so the error gets a line of its own
    with bar, logging_redirect_tqdm(), ThreadPoolExecutor(max_workers) as executor:
        try:
            for prompts, results, usage, secs in completed_requests(
                executor, one_request, make_prompts, max_workers, lambda: len(records) < target
            ):
                before = Counter(stats)
                for result in results:
                    add_response(
                        parse_response(requester.k, result["text"], result["finish_reason"], stats),
                        deduper,
                        records,
                        stats,
                    )
                jsonio.jdump(records, regen_path)  # atomic: a kill leaves the old file or the new one
                seconds.append(secs)
                stats.update(requests=1, tokens=getattr(usage, "total_tokens", 0) or 0)
                log_request(stats, before, len(prompts), secs)
                bar.update(min(len(records), target) - bar.n)
                bar.set_postfix(
                    requests=stats["requests"], tokens=stats["tokens"], dropped=sum(drop_counts(stats).values())
                )
        except FatalRequestError as e:
            requester.stop_event.set()  # the other threads stop retrying
            executor.shutdown(wait=False, cancel_futures=True)
            raise UsageError(f"{e}\n{len(records)} instructions are saved in {regen_path}; rerun to resume.") from e
    return stats, seconds


def completed_requests(executor, send, make_prompts, max_workers, want_more):
    """Yield each request's result as it lands, keeping up to max_workers requests in flight while want_more()."""
    in_flight = set()
    while True:
        while len(in_flight) < max_workers and want_more():
            in_flight.add(executor.submit(send, make_prompts()))
        if not in_flight:
            return
        done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
        for fut in done:
            yield fut.result()


def drop_counts(stats):
    """{reason: count} for every task lost: a filter (blocklist, length, ...), similar, malformed or truncated."""
    return {
        k.removeprefix("dropped_"): v
        for k, v in sorted(stats.items())
        if v and (k.startswith("dropped_") or k in ("malformed", "truncated"))
    }


def log_request(stats, before, n_prompts, secs):
    diff = Counter({k: stats[k] - before[k] for k in stats})
    drops = drop_counts(diff)
    logger.info(
        "request %d (%d prompt%s): %.2f s, %d tokens; kept %d; dropped %s",
        stats["requests"],
        n_prompts,
        "s" if n_prompts > 1 else "",
        secs,
        diff["tokens"],
        diff["kept"],
        ", ".join(f"{k} {v}" for k, v in drops.items()) or "none",
    )


def export_alpaca_rows(records, out_path):
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in records]
    jsonio.jdump(rows, out_path)
    logger.info("wrote %d Alpaca rows to %s", len(rows), out_path)
    return str(out_path)


def export_alpaca(regen_path="regen.json", out_path="alpaca_data.json"):
    """Write regen.json's records as train.py-ready instruction/input/output rows."""
    return export_alpaca_rows(load_regen(Path(regen_path)), out_path)
