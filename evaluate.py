"""Did the fine-tune get better? Answer held-out instructions with two checkpoints, then have any OpenAI-compatible
judge pick the better answer of each pair (AlpacaEval's method and file formats).

    # answers of the base model and of the fine-tune (AlpacaEval's model_outputs format)
    python evaluate.py generate --instructions data/sample_eval.json --output out/eval/base.json
    python evaluate.py generate --model_name_or_path out/demo --instructions data/sample_eval.json \
        --output out/eval/demo.json

    # judge: OpenAI, or any OpenAI-compatible server (vLLM, llama.cpp, Ollama, this repo's serve.py)
    export OPENAI_API_KEY=sk-...
    python evaluate.py judge --model_outputs out/eval/demo.json --reference_outputs out/eval/base.json \
        --judge_model gpt-4o-mini --output_dir out/eval/demo_vs_base
    python evaluate.py judge --model_outputs out/eval/demo.json --reference_outputs out/eval/base.json \
        --base_url http://127.0.0.1:8000/v1 --judge_model embedded:smollm2-135m --output_dir out/eval/smoke

generate saves OUT after every batch and judge saves DIR/annotations.json after every verdict; rerunning the same
command resumes. judge writes DIR/leaderboard.md and DIR/winrate.png and ends with the line
`win_rate: <percent> ± <se> (length-controlled <percent>), <n> pairs, <k> failed`.
"""

import json
import logging
import random
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import tqdm

from alpaca_trainml import jsonio
from alpaca_trainml.cli import UsageError, check_flags, integer, number, run_fire
from alpaca_trainml.evaluation import judging
from alpaca_trainml.generation.limits import flag_checks
from alpaca_trainml.self_instruct.api_client import API_CHOICES, FatalRequestError, Requester, make_client

logger = logging.getLogger(__name__)
REASK_TEMPERATURE = 1.0  # an unparseable verdict is asked again sampled, so a greedy judge can answer differently


def load_rows(path, flag, needs_output):
    """A JSON list of {instruction, input?, output?, generator?} rows; UsageError naming the file and every bad row."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--{flag} {path}: no such file")
    try:
        rows = jsonio.jload(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--{flag} {path}: not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise UsageError(f"--{flag} {path}: expected a JSON list of rows, found {type(rows).__name__}")
    fields = ("instruction", "output") if needs_output else ("instruction",)
    problems = [
        f"row {i}: needs string field(s) {', '.join(fields)} and an optional string 'input'"
        for i, r in enumerate(rows)
        if not isinstance(r, dict)
        or not all(isinstance(r.get(k), str) for k in fields)
        or not isinstance(r.get("input") or "", str)
    ]
    if problems:
        raise UsageError(f"--{flag} {path}: {len(problems)} bad row(s):\n  " + "\n  ".join(problems[:20]))
    return rows


# ---------------------------------------------------------------------------------------------
# generate: model_outputs for a list of instructions, through generation.model.InstructModel
def encode_row(model, row, i, max_tokens):
    """The row's prompt ids; an over-long input is cut at its end. UsageError naming the row if it cannot fit."""
    try:
        ids = model.encode_instruction(row["instruction"], row.get("input") or None, truncate=True)
        model.check_fits(len(ids), max_tokens)
        return ids
    except ValueError as e:
        raise UsageError(f"--instructions row {i}: {e}") from e


def generate(
    instructions,
    output,
    model_name_or_path=None,
    generator=None,
    max_tokens=512,
    batch_size=8,
    temperature=0.0,
    top_p=1.0,
    max_prompt_tokens=None,
):
    """Write OUT: one {instruction, input, output, generator} row per instruction, in the file's order.

    generator defaults to the model folder's name. Rows already in OUT (same generator) are kept and skipped."""
    check_flags(
        [
            ("instructions", instructions, isinstance(instructions, (str, Path)), "a file path"),
            ("output", output, isinstance(output, (str, Path)), "a file path"),
            ("max_tokens", max_tokens, integer(max_tokens, 1), "an integer of at least 1"),
            ("batch_size", batch_size, integer(batch_size, 1), "an integer of at least 1"),
            *flag_checks(temperature, top_p),
            (
                "max_prompt_tokens",
                max_prompt_tokens,
                max_prompt_tokens is None or integer(max_prompt_tokens, 1),
                "an integer",
            ),
        ]
    )
    rows = load_rows(instructions, "instructions", needs_output=False)
    check_flags([], judging.repeated_tasks(rows, "--instructions"))  # judge could not pair a task given twice
    from alpaca_trainml.generation.decoding import GenParams
    from alpaca_trainml.generation.model import InstructModel  # here: `judge` needs no torch

    model = InstructModel(model_name_or_path, max_prompt_tokens)
    generator = generator or Path(str(model.name).rstrip("/")).name
    done = load_partial_outputs(Path(output), rows, generator)
    todo = [(i, r) for i, r in enumerate(rows) if judging.pair_key(r) not in done]
    params = GenParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    logger.info(
        "%d instructions, %d already in %s; generating %d with %s", len(rows), len(done), output, len(todo), model.name
    )
    prompts = [encode_row(model, r, i, max_tokens) for i, r in todo]  # every row checked before any generation
    with tqdm.tqdm(total=len(rows), initial=len(done), unit="row") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            results = model.generate(prompts[start : start + batch_size], params)
            for (_, row), result in zip(batch, results):
                done[judging.pair_key(row)] = dict(
                    instruction=row["instruction"],
                    input=row.get("input") or "",
                    output=result.text.strip(),
                    generator=generator,
                )
            jsonio.jdump([done[judging.pair_key(r)] for r in rows if judging.pair_key(r) in done], output)  # atomic
            bar.update(len(batch))
    logger.info("wrote %d outputs of %s to %s", len(rows), generator, output)
    return str(output)


def load_partial_outputs(path, rows, generator):
    """{task: row} of an earlier run's OUT, to resume; UsageError when OUT is not a partial run of this command."""
    if not path.exists():
        return {}
    earlier = load_rows(path, "output", needs_output=True)
    wanted = {judging.pair_key(r) for r in rows}
    strangers = [
        i for i, r in enumerate(earlier) if judging.pair_key(r) not in wanted or r.get("generator") != generator
    ]
    if strangers:
        raise UsageError(
            f"--output {path} holds {len(strangers)} row(s) (first: row {strangers[0]}) that are not {generator}'s "
            "answers to --instructions; pass another --output, or --generator, or move the file away"
        )
    return {judging.pair_key(r): r for r in earlier}


# ---------------------------------------------------------------------------------------------
# judge: one verdict per pair, saved as it lands; then the leaderboard and the picture
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
        load_rows(model_outputs, "model_outputs", needs_output=True),
        load_rows(reference_outputs, "reference_outputs", needs_output=True),
    )
    if not pairs:
        raise UsageError(f"--model_outputs {model_outputs}: no rows, nothing to judge")
    out = Path(output_dir)
    rng = random.Random(seed)  # one draw per pair, in model_outputs' order: the same seed shows the same orders
    todo = [new_annotation(m, r, model_first=rng.random() < 0.5) for m, r in pairs]
    annotations = resume(out / "annotations.json", todo)
    client, base_url = make_client(base_url, api_key, request_timeout)
    requester = Requester(
        client, api, judge_model, max_tokens, max_retries=max_retries, retry_base_s=retry_base_s, temperature=0
    )
    run_judge(requester, annotations, out / "annotations.json", verdict_retries, max_workers)
    summary = judging.summarize(annotations)
    where = f"{judge_model} at {base_url or 'api.openai.com'} ({api} API)"
    write_leaderboard(out / "leaderboard.md", summary, annotations, where, seed)
    plot(out / "winrate.png", summary, annotations)
    print(
        f"win_rate: {summary['win_rate']:.1f}% ± {summary['standard_error']:.1f} "
        f"(length-controlled {summary['length_controlled_win_rate']:.1f}%), "
        f"{summary['pairs']} pairs, {summary['failed']} failed"
    )


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
    with tqdm.tqdm(total=len(annotations), initial=len(annotations) - len(pending), unit="pair") as bar:
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


def write_leaderboard(path, s, annotations, where, seed):
    model, reference = annotations[0]["generator_2"], annotations[0]["generator_1"]
    lines = [
        f"# {model} against {reference}",
        "",
        f"Judge: {where}, seed {seed}. {s['pairs']} pairs; output (a) was the model's in "
        f"{sum(a['shown_first'] == 'model' for a in annotations)} of them.",
        "",
        "| model | reference | win rate | standard error | length-controlled win rate "
        "| wins | losses | draws | failed | mean length (model) | mean length (reference) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {model} | {reference} | {s['win_rate']:.1f}% | {s['standard_error']:.1f} "
        f"| {s['length_controlled_win_rate']:.1f}% | {s['wins']} | {s['losses']} | {s['draws']} | {s['failed']} "
        f"| {s['mean_length_model']:.0f} | {s['mean_length_reference']:.0f} |",
        "",
        "Win rate: the share of judged pairs the model won, a draw counting half (identical outputs are draws without "
        "asking). Length-controlled: AlpacaEval 2.0's logistic fit of the preference on tanh(length difference / its "
        f"standard deviation, {s['length_fit']['scale']:.0f} characters) read off at equal lengths (fit: "
        f"b0 = {s['length_fit']['b0']:.3f}, b1 = {s['length_fit']['b1']:.3f}). Lengths are in characters. Failed "
        "pairs (no parseable verdict) are left out of both rates.",
    ]
    jsonio.atomic_write(path, lambda fh: fh.write("\n".join(lines) + "\n"))


def plot(path, s, annotations):
    """Left: the win rate with its standard error, and the length-controlled rate. Right: each pair's preference
    against its length difference, with the fitted curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["win rate", "length-controlled"], [s["win_rate"], s["length_controlled_win_rate"]], color=["C0", "C1"])
    left.errorbar([0], [s["win_rate"]], yerr=[s["standard_error"]], color="black", capsize=6)
    left.axhline(50, color="gray", linestyle="--", linewidth=1)
    left.set(ylim=(0, 100), ylabel="% of pairs won by the model", title=f"{s['judged']} judged, {s['failed']} failed")
    judged = [a for a in annotations if a["preference"] is not None]
    diff = np.array([len(a["output_2"]) - len(a["output_1"]) for a in judged], dtype=float)
    won = np.array([a["preference"] - 1 for a in judged], dtype=float)
    jitter = np.random.default_rng(0).uniform(-0.03, 0.03, len(won))  # overlapping points stay visible
    right.scatter(diff, won + jitter, s=12, alpha=0.6)
    fit = s["length_fit"]
    if judged and fit["scale"] > 0:
        grid = np.linspace(diff.min(), diff.max(), 200)
        right.plot(grid, 1 / (1 + np.exp(-(fit["b0"] + fit["b1"] * np.tanh(grid / fit["scale"])))), color="C1")
    right.set(xlabel="length difference, model - reference (characters)", ylabel="preference (1 = model won)")
    fig.suptitle(f"{annotations[0]['generator_2']} against {annotations[0]['generator_1']}")
    fig.tight_layout()
    jsonio.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100), mode="wb")
    plt.close(fig)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # one line per HTTP call would bury ours (openai 3 logs through httpx2)
        logging.getLogger(name).setLevel(logging.WARNING)
    run_fire({"generate": generate, "judge": judge}, "evaluate.py")
