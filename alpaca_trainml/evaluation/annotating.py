"""Judging pairs with an OpenAI-compatible judge: one annotation per pair (AlpacaEval's fields and ours), asked
max_workers at a time, each saved as it lands, so a killed run resumes without asking again."""

import json
import logging
from concurrent.futures import ThreadPoolExecutor, as_completed

import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from alpaca_trainml import jsonio
from alpaca_trainml.cli import UsageError
from alpaca_trainml.evaluation import judging
from alpaca_trainml.self_instruct.api_client import FatalRequestError

logger = logging.getLogger(__name__)
REASK_TEMPERATURE = 1.0  # an unparseable verdict is asked again sampled, so a greedy judge can answer differently


def new_annotation(model_row, reference_row, model_first):
    identical = model_row["output"].strip() == reference_row["output"].strip()
    return dict(
        instruction=model_row["instruction"],
        input=model_row.get("input") or "",
        output_1=reference_row["output"],
        generator_1=reference_row.get("generator", "reference"),
        output_2=model_row["output"],
        generator_2=model_row.get("generator", "model"),
        shown_first="model" if model_first else "reference",  # the output shown as "Output (a)"
        raw_verdicts=[],  # the judge's answers, one per ask
        preference=judging.DRAW if identical else None,  # identical outputs: a draw, without asking
        status="identical" if identical else "todo",
    )


def resume(path, annotations):
    """annotations, with the finished ones of an earlier run (same task and outputs) taken from path."""
    if not path.exists():
        return annotations
    try:
        earlier = jsonio.jload(path)
        finished = {
            (a["instruction"], a["input"], a["output_1"], a["output_2"]): a
            for a in earlier
            if a["status"] in ("judged", "failed", "identical") and "preference" in a
        }
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise UsageError(f"{path}: not an annotations file of evaluate.py ({e}); move it away to start over") from e
    out = [finished.get((a["instruction"], a["input"], a["output_1"], a["output_2"]), a) for a in annotations]
    logger.info("%d of %d pairs already judged in %s", sum(a["status"] != "todo" for a in out), len(out), path)
    return out


def ask(requester, annotation, verdict_retries):
    """The annotation with its verdict: asked up to 1 + verdict_retries times until one parses."""
    a = dict(annotation, raw_verdicts=[])
    model_first = a["shown_first"] == "model"
    first, second = (a["output_2"], a["output_1"]) if model_first else (a["output_1"], a["output_2"])
    prompt = judging.judge_prompt(a["instruction"], a["input"], first, second)
    for attempt in range(1 + verdict_retries):
        (result,), _ = requester([prompt], **({"temperature": REASK_TEMPERATURE} if attempt else {}))
        a["raw_verdicts"].append(result["text"])
        verdict = judging.parse_verdict(result["text"])
        if verdict:
            a["preference"], a["status"] = judging.preference(verdict, model_first), "judged"
            return a
    a["status"] = "failed"  # left out of the rates, counted in the leaderboard
    return a


def run_judge(requester, annotations, path, verdict_retries, max_workers):
    """Ask for every pending verdict, max_workers at a time; save all annotations finished so far after each one."""
    pending = [i for i, a in enumerate(annotations) if a["status"] == "todo"]

    def save():  # atomic: a kill leaves the old file or the new one
        jsonio.jdump([a for a in annotations if a["status"] != "todo"], path)

    save()
    # the retries' log lines and the final error go above the bar, not onto its line
    bar = tqdm.tqdm(total=len(annotations), initial=len(annotations) - len(pending), unit="pair")
    with bar, logging_redirect_tqdm():
        with ThreadPoolExecutor(max_workers) as pool:
            futures = {pool.submit(ask, requester, annotations[i], verdict_retries): i for i in pending}
            try:
                for future in as_completed(futures):
                    annotations[futures[future]] = future.result()  # only this thread writes the list
                    save()
                    bar.update(1)
            except FatalRequestError as e:
                requester.stop_event.set()  # the other threads stop retrying
                pool.shutdown(wait=False, cancel_futures=True)
                raise UsageError(f"judge: {e}\nthe verdicts so far are saved in {path}; rerun to resume") from e
