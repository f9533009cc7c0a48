"""Did the fine-tune get better? Answer held-out instructions with two checkpoints, then have any OpenAI-compatible
judge pick the better answer of each pair: AlpacaEval's method and its file formats, so answers made here can go
through `alpaca_eval --model_outputs ...`, and outputs or annotations made by alpaca_eval can be judged or scored here.

    # answers of the base model and of the fine-tune (AlpacaEval's model_outputs format)
    python evaluate.py generate --eval_set data/sample_eval.json --output out/eval/base.json
    python evaluate.py generate --model_name_or_path out/demo --eval_set data/sample_eval.json \
        --output out/eval/demo.json

    # AlpacaEval's 805 instructions as downloaded (alpaca_eval.json); its GPT-4 answers become the reference file
    python evaluate.py generate --model_name_or_path out/demo --eval_set alpaca_eval.json \
        --output out/eval/demo_805.json --reference_output out/eval/gpt4_805.json

    # judge: OpenAI, or any OpenAI-compatible server (vLLM, llama.cpp, Ollama, this repo's serve.py)
    export OPENAI_API_KEY=sk-...
    python evaluate.py judge --model_outputs out/eval/demo.json --reference_outputs out/eval/base.json \
        --judge_model gpt-4o-mini --output_dir out/eval/demo_vs_base
    python evaluate.py judge --model_outputs out/eval/demo.json --reference_outputs out/eval/base.json \
        --base_url http://127.0.0.1:8000/v1 --judge_model embedded:smollm2-135m --output_dir out/eval/smoke

    # the leaderboard of an annotations file, ours or alpaca_eval's (results/<model>/<annotator>/annotations.json)
    python evaluate.py winrate --annotations out/eval/demo_vs_base/annotations.json --output_dir out/eval/rescored

generate answers through the serving engine (continuous batching) and saves OUT as answers land; judge saves
DIR/annotations.json after every verdict; rerunning the same command resumes either. judge and winrate write
DIR/leaderboard.md and DIR/winrate.png and end with the line
`win_rate: <percent> ± <se> (length-controlled <percent>), <n> pairs, <k> failed`.
"""

import logging

from alpaca_trainml.cli import UsageError, run_fire
from alpaca_trainml.evaluation.commands import COMMANDS, generate, judge, winrate, write_reports

__all__ = ["generate", "judge", "winrate", "write_reports", "COMMANDS", "UsageError"]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # one line per HTTP call would bury ours (openai 3 logs through httpx2)
        logging.getLogger(name).setLevel(logging.WARNING)
    run_fire(COMMANDS, "evaluate.py")
