"""`alpaca`: the scripts' commands under one name (as llamafactory-cli, axolotl, tune and litgpt do), and `alpaca run`.

    alpaca --help                                   # the commands
    alpaca train --output_dir out/demo              # python train.py --output_dir out/demo
    alpaca train config.yaml --learning_rate 1e-4   # flags from a YAML or JSON file; flags after it override it
    alpaca run recipes/demo.yaml                    # generate -> sft -> dpo -> evaluate -> export, into out/loop

`alpaca X ARGS` runs what `python X.py ARGS` runs (train.py, train_dpo.py, generate_instruction.py, evaluate.py,
export_gguf.py, serve.py, weight_diff.py), through the same package code, with the same flags and errors.
"""

import argparse
import logging
import sys
from functools import partial

from alpaca_trainml import cli

COMMANDS = {
    "train": "supervised fine-tuning, full or LoRA (train.py)",
    "dpo": "preference tuning with DPO (train_dpo.py)",
    "generate": "self-instruct data from an OpenAI-compatible teacher (generate_instruction.py)",
    "evaluate": "answer an eval set, judge the answers, score a win rate (evaluate.py)",
    "export": "a checkpoint to one GGUF file for llama.cpp and Ollama (export_gguf.py)",
    "serve": "serve a checkpoint: OpenAI-compatible API, /instruct and the web UI (serve.py)",
    "diff": "weight diffs against a base model: make_diff, recover, merge_lora (weight_diff.py)",
    "run": "run a recipe's stages into a run folder with manifest.json (recipes/*.yaml)",
}


def usage():
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return (
        "usage: alpaca <command> [args ...]\n\ncommands:\n"
        + "\n".join(lines)
        + ("\n\n`alpaca <command> --help` shows the command's flags; a YAML or JSON config file may come first.")
    )


def train(argv):
    from alpaca_trainml.training.sft import train

    cli.run("alpaca train", train, argv)


def dpo(argv):
    from alpaca_trainml.training.dpo import train_dpo

    cli.run("alpaca dpo", train_dpo, argv)


def generate(argv):
    from alpaca_trainml.self_instruct.generate import export_alpaca, generate_instruction_following_data

    commands = {"generate_instruction_following_data": generate_instruction_following_data}
    cli.run_fire({**commands, "export_alpaca": export_alpaca}, "alpaca generate", argv)


def evaluate(argv):
    from alpaca_trainml.evaluation.commands import COMMANDS as EVALUATE_COMMANDS

    cli.run_fire(EVALUATE_COMMANDS, "alpaca evaluate", argv)


def export(argv):
    from alpaca_trainml.export import command

    cli.run("alpaca export", lambda: command.main(command.parse_args(argv, "alpaca export")))


def serve(argv):
    from alpaca_trainml.generation import serve_command

    cli.run("alpaca serve", lambda: serve_command.main(serve_command.parse_args(argv, "alpaca serve")))


def diff(argv):
    from alpaca_trainml.checkpoints import weight_diff
    from alpaca_trainml.generation.model import sample_completion

    recover = partial(weight_diff.recover, sample=sample_completion)  # as weight_diff.py: --test_inference generates
    commands = {"make_diff": weight_diff.make_diff, "recover": recover, "merge_lora": weight_diff.merge_lora}
    cli.run_fire(commands, "alpaca diff", argv)


def run(argv):
    from alpaca_trainml.loop.runner import Interrupted, StageFailed
    from alpaca_trainml.loop.runner import run as run_recipe

    p = argparse.ArgumentParser(prog="alpaca run", description="Run a recipe's stages; unchanged ones are skipped.")
    p.add_argument("recipe", help="a YAML or JSON recipe (recipes/demo.yaml)")
    p.add_argument("--run_dir", default=None, help="the run folder (default: the recipe's run_dir)")
    p.add_argument("--check", action="store_true", help="check the recipe and exit without running anything")
    p.add_argument("--rerun", default=None, help="run this stage and the later ones again, even if unchanged")
    args = p.parse_args(argv)
    if args.check:
        from alpaca_trainml.loop.recipe import load

        cli.run("alpaca run", load, args.recipe)
        print(f"{args.recipe}: ok")
        return
    try:
        cli.run("alpaca run", run_recipe, args.recipe, args.run_dir, print, args.rerun)
    except StageFailed as e:
        print(f"alpaca run: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except Interrupted as e:
        print(f"alpaca run: {e}", file=sys.stderr)
        raise SystemExit(130) from None  # the shell's status for Ctrl-C


HANDLERS = {name: globals()[name] for name in COMMANDS}


def main(argv=None):
    """Dispatch `alpaca <command> ARGS` to the command's code; no command or --help lists them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None if argv else sys.exit(cli.USAGE_EXIT)
    name, rest = argv[0], argv[1:]
    if name not in HANDLERS:
        cli.exit_usage("alpaca", f"unknown command {name!r}{cli.closest(name, list(COMMANDS))}; see alpaca --help")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for quiet in ("httpx", "httpx2"):  # one line per HTTP call would bury ours
        logging.getLogger(quiet).setLevel(logging.WARNING)
    if name in ("train", "dpo"):
        import transformers

        transformers.utils.logging.set_verbosity_warning()
    return HANDLERS[name](rest)
