"""train.py --show_labels N: the first N training examples exactly as the loss sees them, before any training.

Each example is decoded run by run: the tokens the loss trains on are marked [[ ... ]] (green on a terminal), the
rest (prompts, system and user turns) is printed plain, so a wrong mask shows at a glance.
"""

import sys

from alpaca_trainml.data.special_tokens import IGNORE_INDEX

GREEN, RESET = "\033[32m", "\033[0m"


def runs(labels):
    """[(start, end, trained)]: the maximal runs of trained and untrained positions."""
    out, start = [], 0
    trained = [int(x) != IGNORE_INDEX for x in labels]
    for t in range(1, len(trained) + 1):
        if t == len(trained) or trained[t] != trained[start]:
            out.append((start, t, trained[start]))
            start = t
    return out


def render_example(tokenizer, input_ids, labels, colour=False):
    """The example's text with its trained runs marked."""
    ids = [int(x) for x in input_ids]
    parts = []
    for start, end, trained in runs(labels):
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        parts.append((f"{GREEN}{text}{RESET}" if colour else f"[[{text}]]") if trained else text)
    return "".join(parts)


def show_labels(dataset, tokenizer, n, out=None, colour=None):
    """Print the first n examples of a SupervisedDataset, each with its token counts."""
    out = out or sys.stdout
    colour = out.isatty() if colour is None else colour
    rows = getattr(dataset, "example_rows", range(len(dataset)))
    for i in range(min(n, len(dataset))):
        example = dataset[i]
        total, trained = len(example["labels"]), int((example["labels"] != IGNORE_INDEX).sum())
        print(f"=== example {i} (row {rows[i]}): {total} tokens, {trained} trained", file=out)
        print(render_example(tokenizer, example["input_ids"], example["labels"], colour), file=out)
    marks = "green" if colour else "[[ ]]"
    print(
        f"--show_labels: {min(n, len(dataset))} of {len(dataset)} examples shown; trained tokens in {marks}", file=out
    )
