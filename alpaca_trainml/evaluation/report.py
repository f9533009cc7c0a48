"""What a judged run reports: the leaderboard (Markdown), the picture, and the one-line summary."""

from alpaca_trainml import jsonio


def summary_line(s):
    """The last line evaluate.py prints."""
    return (
        f"win_rate: {s['win_rate']:.1f}% ± {s['standard_error']:.1f} "
        f"(length-controlled {s['length_controlled_win_rate']:.1f}%), {s['pairs']} pairs, {s['failed']} failed"
    )


def write_leaderboard(path, s, annotations, where):
    model, reference = annotations[0]["generator_2"], annotations[0]["generator_1"]
    lines = [
        f"# {model} against {reference}",
        "",
        f"Judge: {where}. {s['pairs']} pairs{shown_first(annotations)}.",
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


def shown_first(annotations):
    """'; output (a) was the model's in N of them', where the annotations say (alpaca_eval's do not)."""
    if not all("shown_first" in a for a in annotations):
        return ""
    return f"; output (a) was the model's in {sum(a['shown_first'] == 'model' for a in annotations)} of them"


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
