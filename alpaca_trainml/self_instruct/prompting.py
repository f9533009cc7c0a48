"""Self-Instruct as Alpaca ran it: the seed tasks, the prompt built from them, and the parsing and filtering of
what the model answers. Pure functions over text; generate.py does the requests and the bookkeeping."""

import json
import re
import string
from collections import Counter
from pathlib import Path

from alpaca_trainml import REPO_ROOT
from alpaca_trainml.cli import UsageError

HERE = REPO_ROOT  # prompt.txt and seed_tasks.jsonl
PROMPT_PATH = HERE / "prompt.txt"
SEED_TASKS_PATH = HERE / "seed_tasks.jsonl"
STOP_SEQUENCES = ["\n20", "20.", "20."]  # as the original: the prompt asks for 20 tasks, stop before the 20th
NUM_PROMPT_TASKS = 20
# tasks a text-only model cannot do; "go to" is the one two-word entry
BLOCKLIST = "image images graph graphs picture pictures file files map maps draw plot".split() + ["go to"]
BLOCKLIST += "video audio music flowchart diagram".split()


def load_seed_tasks(path):
    """Self-Instruct seed tasks (one JSON object a line) as {instruction, input, output}, from each first instance.

    Reads the original Self-Instruct file unchanged. Raises ValueError listing every bad line."""
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such seed task file; pass --seed_tasks_path (default {SEED_TASKS_PATH})")
    rows, problems = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {lineno}: not valid JSON ({e.msg})")
                continue
            instances = task.get("instances") if isinstance(task, dict) else None
            first = instances[0] if isinstance(instances, list) and instances else None
            if not isinstance(task, dict) or not isinstance(task.get("instruction"), str):
                problems.append(f"line {lineno}: needs a string 'instruction'")
            elif not isinstance(first, dict) or not all(isinstance(first.get(k), str) for k in ("input", "output")):
                problems.append(f'line {lineno}: needs \'instances\': [{{"input": str, "output": str}}, ...]')
            else:
                rows.append({"instruction": task["instruction"], "input": first["input"], "output": first["output"]})
    if problems:
        raise UsageError(
            f"{path}: {len(problems)} bad seed task(s), expected the Self-Instruct schema:\n  "
            + "\n  ".join(problems[:20])
        )
    return rows


def encode_prompt(prompt_instructions, prompt_path=PROMPT_PATH):
    """prompt.txt, then the example tasks numbered 1..k, ###-separated, then an open '###\\n{k+1}. Instruction:'."""
    # rstrip: our prompt.txt ends with a newline, the original's did not; the result is the same layout
    prompt = Path(prompt_path).read_text(encoding="utf-8").rstrip("\n") + "\n"
    for idx, task in enumerate(prompt_instructions, 1):
        instruction = re.sub(r"\s+", " ", task["instruction"]).strip().rstrip(":")
        task_input = "<noinput>" if task["input"].lower() == "" else task["input"]
        prompt += (
            f"###\n{idx}. Instruction: {instruction}\n{idx}. Input:\n{task_input}\n{idx}. Output:\n{task['output']}\n"
        )
    return prompt + f"###\n{len(prompt_instructions) + 1}. Instruction:"


def find_word_in_string(w, s):
    return re.compile(rf"\b({w})\b", flags=re.IGNORECASE).search(s)


def rejection_reason(inst):
    """Why the original's filters drop this instruction, or None.

    One of 'length', 'blocklist', 'program', 'punctuation', 'non_ascii'."""
    n_words = len(inst.split())
    if n_words <= 3 or n_words > 150:
        return "length"
    if any(find_word_in_string(word, inst) for word in BLOCKLIST):
        return "blocklist"
    if inst.startswith("Write a program"):  # the model tends to bolt this onto other tasks
        return "program"
    if inst[0] in string.punctuation:
        return "punctuation"
    if not inst[0].isascii():
        return "non_ascii"
    return None


# The prompt's own layout: a field that still holds it is the teacher numbering tasks its own way, not a task.
SCAFFOLDING = re.compile(r"^\s*\d+\s*\.\s*(Instruction|Input|Output)\s*:|###", re.MULTILINE | re.IGNORECASE)


def record_rejection_reason(record):
    """Why a parsed record is dropped, or None: 'scaffolding' when a field holds a numbered Instruction/Input/Output
    header or '###' (a weak teacher's "1. Instruction: ...\n2. Input: ..." inside one task), else the original's
    filters on the instruction (rejection_reason)."""
    if any(SCAFFOLDING.search(record[k]) for k in ("instruction", "input", "output")):
        return "scaffolding"
    return rejection_reason(record["instruction"])


def parse_response(num_prompt_instructions, text, finish_reason, stats=None):
    """Split a completion into {instruction, input, output} records, unfiltered.

    Counts 'malformed' and 'truncated' in stats."""
    stats = Counter() if stats is None else stats
    pieces = re.split("###", f"{num_prompt_instructions + 1}. Instruction:" + text)
    records = []
    for i, piece in enumerate(pieces):
        if i == len(pieces) - 1 and finish_reason == "length":  # cut off by max_tokens: likely incomplete
            stats["truncated"] += 1
            continue
        parts = re.split(rf"{i + num_prompt_instructions + 1}\.\s+(Instruction|Input|Output):", piece)
        if len(parts) != 7:
            stats["malformed"] += bool(piece.strip())  # the blank piece after a final "###" is no loss
            continue
        task_input = parts[4].strip()
        records.append(
            {
                "instruction": parts[2].strip(),
                "input": "" if task_input.lower() == "<noinput>" else task_input,
                "output": parts[6].strip(),
            }
        )
    return records


def post_process_gpt3_response(num_prompt_instructions, response):
    """The original's parse-and-filter of one choice ({'text', 'finish_reason'}), and the scaffolding filter."""
    if response is None:
        return []
    records = parse_response(num_prompt_instructions, response["text"], response["finish_reason"])
    return [r for r in records if record_rejection_reason(r) is None]


# ---------------------------------------------------------------------------------------------
# Requests: api_client's, with the original's decoding (completions: batched prompts; chat: one prompt a request).
def strip_chat_echo(text, num_prompt_instructions):
    """Chat models answer in a fresh message and often restate '###\\n{k+1}. Instruction:' that a completion would
    continue from; drop it so the original parsing applies unchanged."""
    head = re.match(rf"\s*(###\s*)?{num_prompt_instructions + 1}\.\s+Instruction:", text)
    return text[head.end() :] if head else text
