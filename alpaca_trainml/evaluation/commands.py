"""evaluate.py's commands (also `alpaca evaluate`): generate answers, judge them against references, score the
verdicts. See evaluate.py for the commands ready to paste."""

import logging
import random
from pathlib import Path

import tqdm

from alpaca_trainml import jsonio
from alpaca_trainml.cli import UsageError, check_flags, integer, number
from alpaca_trainml.evaluation import annotating, formats, judging, report
from alpaca_trainml.generation.limits import flag_checks
from alpaca_trainml.self_instruct.api_client import API_CHOICES, Requester, make_client

logger = logging.getLogger(__name__)


def generate(
    eval_set=None,
    output=None,
    model_name_or_path=None,
    generator=None,
    max_tokens=512,
    batch_size=8,
    temperature=0.0,
    top_p=1.0,
    max_prompt_tokens=None,
    reference_output=None,
    instructions=None,
    speculative="none",
    dtype=None,
):
    """Write OUT: one model_outputs row {instruction, output, generator} per eval-set row, in the file's order.

    eval_set: Alpaca rows or AlpacaEval's alpaca_eval.json (instructions is its old name). generator defaults to the
    model folder's name. Rows already in OUT (same generator) are kept and skipped. batch_size: rows decoded together.
    reference_output: also write the eval set's own outputs there (AlpacaEval's are GPT-4's), as reference_outputs.
    speculative: "ngram" for speculative decoding by prompt lookup (the same greedy answers), or "none".
    dtype: the weights' type, as serve.py's --dtype (int8: quantized at load, about 2x faster decoding on a CPU)."""
    from alpaca_trainml.generation.speculative import MODES, lookup_for  # here: `judge` needs no torch
    from alpaca_trainml.precision import DTYPE_CHOICES

    flag = "instructions" if eval_set is None and instructions is not None else "eval_set"  # as the user wrote it
    eval_set = eval_set if eval_set is not None else instructions
    check_flags(
        [
            (flag, eval_set, isinstance(eval_set, (str, Path)), "a file path"),
            ("output", output, isinstance(output, (str, Path)), "a file path"),
            ("max_tokens", max_tokens, integer(max_tokens, 1), "an integer of at least 1"),
            ("batch_size", batch_size, integer(batch_size, 1), "an integer of at least 1"),
            *flag_checks(temperature, top_p),
            ("speculative", speculative, speculative in MODES, f"one of {', '.join(MODES)}"),
            ("dtype", dtype, dtype is None or dtype in DTYPE_CHOICES, f"one of {', '.join(DTYPE_CHOICES)}"),
            (
                "max_prompt_tokens",
                max_prompt_tokens,
                max_prompt_tokens is None or integer(max_prompt_tokens, 1),
                "an integer",
            ),
            (
                "reference_output",
                reference_output,
                reference_output is None or isinstance(reference_output, (str, Path)),
                "a file path",
            ),
        ]
    )
    tasks = formats.load_rows(eval_set, flag, needs_output=False)
    check_flags([], judging.repeated_tasks(tasks, f"--{flag}"))  # judge could not pair a task given twice
    if reference_output is not None:
        jsonio.jdump(formats.reference_rows(tasks, flag), reference_output)
    from alpaca_trainml.evaluation.answering import answer_all, encode_task
    from alpaca_trainml.generation.decoding import GenParams
    from alpaca_trainml.generation.model import InstructModel  # here: `judge` needs no torch

    model = InstructModel(model_name_or_path, max_prompt_tokens, dtype=dtype, speculative=lookup_for(speculative))
    generator = generator or Path(str(model.name).rstrip("/")).name
    done = formats.load_partial_outputs(output, tasks, generator)
    todo = [(i, t) for i, t in enumerate(tasks) if judging.pair_key(t) not in done]
    logger.info(
        "%d tasks, %d already in %s; generating %d with %s", len(tasks), len(done), output, len(todo), model.name
    )
    prompts = [encode_task(model, t, i, max_tokens, flag) for i, t in todo]  # every row checked before any generation
    params = GenParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    with tqdm.tqdm(total=len(tasks), initial=len(done), unit="row") as bar:

        def save(k, completion):  # atomic, after every answer: a kill loses at most the answers in flight
            task = todo[k][1]
            done[judging.pair_key(task)] = formats.output_row(task, completion.text.strip(), generator)
            jsonio.jdump([done[judging.pair_key(t)] for t in tasks if judging.pair_key(t) in done], output)
            bar.update(1)

        answer_all(model, prompts, params, batch_size, save)
    logger.info("wrote %d outputs of %s to %s", len(tasks), generator, output)
    return str(output)


def judge(
    model_outputs,
    reference_outputs,
    judge_model,
    output_dir,
    base_url=None,
    api_key=None,
    api="chat",
    seed=0,
    max_workers=4,
    max_tokens=32,
    verdict_retries=2,
    request_timeout=120.0,
    max_retries=6,
    retry_base_s=1.0,
):
    """Judge model_outputs against reference_outputs; write DIR/annotations.json, leaderboard.md and winrate.png.

    max_tokens: the judge's answer length (a verdict is a few tokens). verdict_retries: times an unparseable verdict
    is asked again (sampled at temperature 1) before the pair counts as failed."""
    paths = dict(model_outputs=model_outputs, reference_outputs=reference_outputs, output_dir=output_dir)
    check_flags(
        [
            ("judge_model", judge_model, isinstance(judge_model, str) and bool(judge_model), "a model name"),
            *((flag, v, isinstance(v, (str, Path)), "a path") for flag, v in paths.items()),
            ("api", api, api in API_CHOICES, " or ".join(API_CHOICES)),
            ("seed", seed, integer(seed), "an integer"),
            ("max_workers", max_workers, integer(max_workers, 1), "an integer of at least 1"),
            ("max_tokens", max_tokens, integer(max_tokens, 1), "an integer of at least 1"),
            ("verdict_retries", verdict_retries, integer(verdict_retries, 0), "an integer of at least 0"),
            ("request_timeout", request_timeout, number(request_timeout, 0.001), "seconds above 0"),
            ("max_retries", max_retries, integer(max_retries, 0), "an integer of at least 0"),
            ("retry_base_s", retry_base_s, number(retry_base_s, 0), "seconds, at least 0"),
        ]
    )
    pairs = judging.match_pairs(
        formats.load_rows(model_outputs, "model_outputs", needs_output=True),
        formats.load_rows(reference_outputs, "reference_outputs", needs_output=True),
    )
    if not pairs:
        raise UsageError(f"--model_outputs {model_outputs}: no rows, nothing to judge")
    out = Path(output_dir)
    rng = random.Random(seed)  # one draw per pair, in model_outputs' order: the same seed shows the same orders
    todo = [annotating.new_annotation(m, r, model_first=rng.random() < 0.5) for m, r in pairs]
    annotations = annotating.resume(out / "annotations.json", todo)
    client, base_url = make_client(base_url, api_key, request_timeout)
    requester = Requester(
        client,
        api,
        judge_model,
        max_tokens,
        max_retries=max_retries,
        retry_base_s=retry_base_s,
        model_flag="--judge_model",
        temperature=0,
    )
    annotating.run_judge(requester, annotations, out / "annotations.json", verdict_retries, max_workers)
    where = f"{judge_model} at {base_url or 'api.openai.com'} ({api} API), seed {seed}"
    write_reports(out, annotations, where)


def winrate(annotations, output_dir):
    """The leaderboard of an annotations file written by evaluate.py judge or by alpaca_eval, without asking a judge:
    win rate, standard error and our length-controlled win rate, in DIR/leaderboard.md and DIR/winrate.png."""
    check_flags(
        [
            ("annotations", annotations, isinstance(annotations, (str, Path)), "a path"),
            ("output_dir", output_dir, isinstance(output_dir, (str, Path)), "a path"),
        ]
    )
    rows = formats.load_annotations(annotations)
    if not rows:
        raise UsageError(f"--annotations {annotations}: no rows")
    write_reports(Path(output_dir), rows, f"the verdicts in {annotations}")


def write_reports(out, annotations, where):
    summary = judging.summarize(annotations)
    report.write_leaderboard(out / "leaderboard.md", summary, annotations, where)
    report.plot(out / "winrate.png", summary, annotations)
    print(report.summary_line(summary))


COMMANDS = {"generate": generate, "judge": judge, "winrate": winrate}
