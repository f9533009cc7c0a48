"""The alpaca_eval side of benchmarks/peers_judging.py, run in .venv-peers (alpaca_eval 0.6.6); imports no
alpaca_trainml.

    .venv-peers/bin/python -m benchmarks.peers_alpaca_eval --work WORK --base_url http://127.0.0.1:PORT/v1

WORK holds model_outputs.json, reference_outputs.json and judge_prompt.txt (evaluate.py's judge prompt, written with
alpaca_eval's {instruction} {output_1} {output_2} fields). This writes an annotator config that sends that prompt to
the OpenAI-compatible judge at --base_url (a client config with base_url, as alpaca_eval's client_configs/README.md
describes), runs alpaca_eval's own evaluate(), and writes WORK/alpaca_eval/result.json: its win rate and standard
error, its length-controlled win rate or why it could not compute one, and the same GLM without the instruction
difficulty term (alpaca_eval's `length_controlled_minimal` formula, fitted with its own code).
"""

import argparse
import json
import os
from pathlib import Path

ANNOTATOR = "peers_judge"
MINIMAL_FORMULA = "np.tanh(std_delta_len) + not_gamed_baseline.astype(float) - 1"


def write_configs(work, base_url, judge_model):
    """The annotator config (alpaca_eval's YAML) and the client config that points its OpenAI client at base_url."""
    cfg = Path(work) / "alpaca_eval_config" / ANNOTATOR
    cfg.mkdir(parents=True, exist_ok=True)
    # alpaca_eval sends a chat model ChatML turns: evaluate.py's prompt is the one user message
    (cfg / "prompt.txt").write_text(f"<|im_start|>user\n{(Path(work) / 'judge_prompt.txt').read_text()}\n<|im_end|>")
    (cfg / "configs.yaml").write_text(
        f"{ANNOTATOR}:\n"
        f'  prompt_template: "{ANNOTATOR}/prompt.txt"\n'
        '  fn_completions: "openai_completions"\n'
        "  completions_kwargs:\n"
        f'    model_name: "{judge_model}"\n'
        "    max_tokens: 32\n"
        "    temperature: 0\n"
        "  completion_parser_kwargs:\n"
        "    outputs_to_match:\n"
        "      1: '^\\s*Output \\(a\\)'\n"
        "      2: '^\\s*Output \\(b\\)'\n"
        "  batch_size: 1\n"
    )
    clients = Path(work) / "alpaca_eval_config" / "client_configs.yaml"
    clients.write_text(f"default:\n  - api_key: not-needed\n    base_url: {base_url}\n")
    return cfg / "configs.yaml", clients


def minimal_lc(annotations):
    """alpaca_eval's GLM (its featurization and its cross-validated L1 logistic fit) on this run's annotations,
    without instruction difficulty, which exists only for its 805 instructions: the win rate at equal length."""
    import numpy as np
    import pandas as pd
    from alpaca_eval.metrics import glm_winrate

    df = pd.DataFrame(annotations)
    df = df[df["preference"].notna()].reset_index(drop=True)
    delta = df["output_1"].str.len() - df["output_2"].str.len()
    train = pd.DataFrame(
        dict(
            preference=df["preference"].astype(float).replace({0.0: 1.5}) - 1,
            std_delta_len=delta / delta.std(),
            not_gamed_baseline=True,
        )
    )
    test = train[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    xy, x_test = glm_winrate.make_dmatrix_for_model(train, test, formula=MINIMAL_FORMULA)
    model = glm_winrate.fit_LogisticRegressionCV(xy, "preference", is_ytrue_proba=True, n_splits=5)
    return float(np.mean(model.predict_proba(x_test)[:, 1]) * 100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--base_url", required=True)
    p.add_argument("--judge_model", default="scripted-judge")
    args = p.parse_args()
    config, clients = write_configs(args.work, args.base_url, args.judge_model)
    os.environ["OPENAI_CLIENT_CONFIG_PATH"] = str(clients)  # read when the client is made
    from alpaca_eval import main as alpaca_eval_main
    from alpaca_eval.metrics import glm_winrate

    work = Path(args.work)
    leaderboard, annotations = alpaca_eval_main.evaluate(
        model_outputs=str(work / "model_outputs.json"),
        reference_outputs=str(work / "reference_outputs.json"),
        annotators_config=str(config),
        output_path=str(work / "alpaca_eval"),
        is_return_instead_of_print=True,
        fn_metric="get_winrate",
        sort_by="win_rate",  # its default sorts by the length-controlled rate, which get_winrate does not give
        precomputed_leaderboard=None,
    )
    row = leaderboard.iloc[0]
    result = dict(win_rate=float(row["win_rate"]), standard_error=float(row["standard_error"]))
    try:  # AlpacaEval 2.0's length-controlled win rate, as it computes it
        lc = glm_winrate.get_length_controlled_winrate(annotations, save_weights_dir=None)
        result["length_controlled"] = float(lc["length_controlled_winrate"])
    except Exception as e:  # noqa: BLE001 - any failure is the finding to report, with its type and message
        result["length_controlled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    result["length_controlled_minimal"] = minimal_lc(annotations)
    (work / "alpaca_eval").mkdir(exist_ok=True)
    (work / "alpaca_eval" / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
