"""The files evaluate.py reads and writes, in AlpacaEval's formats, so either tool can take over from the other.

- An eval set: a JSON (or JSONL) list of rows with `instruction` and an optional `input`: Alpaca rows, or AlpacaEval's
  805-instruction `alpaca_eval.json` as downloaded (instruction, output, generator, dataset; its output is the
  reference answer).
- model_outputs / reference_outputs: AlpacaEval's rows, {instruction, output, generator} (+ `dataset` where the eval
  set has one, + `input` only where it is not empty: AlpacaEval has no input field).
- annotations: AlpacaEval's pairwise annotations, {instruction, output_1, generator_1, output_2, generator_2,
  preference}: output_1 is the reference, preference 1 = the reference won, 2 = the model won, 1.5 (or 0) a draw,
  null/NaN no verdict. evaluate.py writes these fields and its own (input, shown_first, raw_verdicts, status).
"""

import json
import math
from pathlib import Path

from alpaca_trainml import jsonio
from alpaca_trainml.cli import UsageError, misspelled_fields
from alpaca_trainml.evaluation import judging


def read_json_rows(path, flag):
    """The JSON list in path; UsageError naming the file for a missing file, bad JSON or not a list."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--{flag} {path}: no such file")
    try:
        rows = jsonio.jload(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--{flag} {path}: not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise UsageError(f"--{flag} {path}: expected a JSON list of rows, found {type(rows).__name__}")
    return rows


def load_rows(path, flag, needs_output):
    """A JSON list of {instruction, input?, output?, generator?} rows; UsageError naming the file and every bad row."""
    rows = read_json_rows(path, flag)
    fields = ("instruction", "output") if needs_output else ("instruction",)
    problems = [
        f"row {i}: needs string field(s) {', '.join(fields)} and an optional string 'input'"
        for i, r in enumerate(rows)
        if not isinstance(r, dict)
        or not all(isinstance(r.get(k), str) for k in fields)
        or not isinstance(r.get("input") or "", str)
    ]
    problems += [
        f"row {i}: {typo}"
        for i, r in enumerate(rows)
        if isinstance(r, dict)
        for typo in misspelled_fields(r, ("instruction", "input", "output", "generator", "dataset"))
    ]
    if problems:
        problems.sort(key=lambda p: int(p.split(":", 1)[0][4:]))  # by row
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UsageError(f"--{flag} {path}: {len(problems)} bad row(s):\n  " + "\n  ".join(problems[:20]) + more)
    return rows


def output_row(task, output, generator):
    """One model_outputs row in AlpacaEval's format for the eval-set row `task`."""
    row = dict(instruction=task["instruction"], output=output, generator=generator)
    if task.get("input"):
        row["input"] = task["input"]
    if isinstance(task.get("dataset"), str):
        row["dataset"] = task["dataset"]
    return row


def reference_rows(tasks, flag):
    """The eval set's own answers as reference_outputs (AlpacaEval's file carries GPT-4's): UsageError if a row has
    none."""
    missing = [i for i, t in enumerate(tasks) if not isinstance(t.get("output"), str)]
    if missing:
        raise UsageError(
            f"--{flag}: {len(missing)} row(s) have no 'output' to use as the reference (first: {missing[0]})"
        )
    return [output_row(t, t["output"], t.get("generator") or "reference") for t in tasks]


def load_partial_outputs(path, tasks, generator):
    """{task key: row} of an earlier run's OUT, to resume; UsageError when OUT is not a partial run of this command."""
    if not Path(path).exists():
        return {}
    earlier = load_rows(path, "output", needs_output=True)
    wanted = {judging.pair_key(r) for r in tasks}
    strangers = [
        i for i, r in enumerate(earlier) if judging.pair_key(r) not in wanted or r.get("generator") != generator
    ]
    if strangers:
        raise UsageError(
            f"--output {path} holds {len(strangers)} row(s) (first: row {strangers[0]}) that are not {generator}'s "
            "answers to --eval_set; pass another --output, or --generator, or move the file away"
        )
    return {judging.pair_key(r): r for r in earlier}


def preference_of(value):
    """AlpacaEval's preference as evaluate.py keeps it: 1.0, 2.0, 1.5 (a draw, which AlpacaEval may write as 0), or
    None (no verdict: null or NaN). UsageError for anything else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value == 0 or 1 <= value <= 2):
        raise UsageError(f"preference {value!r} is not AlpacaEval's (1 to 2, 0 for a draw, or null)")
    return judging.DRAW if value == 0 else float(value)


def load_annotations(path, flag="annotations"):
    """Pairwise annotations written by evaluate.py or by AlpacaEval, as evaluate.py's annotation dicts."""
    rows = read_json_rows(path, flag)
    out, problems = [], []
    for i, r in enumerate(rows):
        try:
            if not all(isinstance(r.get(k), str) for k in ("instruction", "output_1", "output_2")):
                raise UsageError("needs string fields instruction, output_1 and output_2")
            preference = preference_of(r.get("preference"))
        except (ValueError, AttributeError) as e:
            problems.append(f"row {i}: {e}")
            continue
        out.append(
            dict(
                r,
                input=r.get("input") or "",
                generator_1=r.get("generator_1", "reference"),
                generator_2=r.get("generator_2", "model"),
                preference=preference,
            )
        )
    if problems:
        raise UsageError(f"--{flag} {path}: {len(problems)} bad row(s):\n  " + "\n  ".join(problems[:20]))
    return out
