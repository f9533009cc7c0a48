"""A recipe: the loop's stages as sections of one YAML (or JSON) file, each optional, checked whole before any stage
runs. Every mistake in it (an unknown section or key, a bad launcher) is reported together, each with its fix.

    run_dir: out/loop                 # the run folder (alpaca run --run_dir overrides it)
    seed: 42                          # every stage's seed unless the stage sets its own
    threads: 2                        # torch's CPU threads: the same count gives the same floating-point sums
    base_model: embedded:smollm2-135m
    generate: {base_url: ..., model_name: ..., num_instructions_to_generate: 100}  # generate_instruction's flags
    sft: {launcher: in-process, learning_rate: 3.0e-5, ...}                      # train.py's flags
    dpo: {data_path: data/sample_dpo.json, beta: 0.1, ...}                       # train_dpo.py's flags
    evaluate: {eval_set: data/sample_eval.json, max_rows: 8, judge_url: ...}
    export: {outtypes: [q8_0], modelfile: true}
    serve: true                       # print the commands that serve the result
"""

import inspect
from pathlib import Path

from alpaca_trainml import cli

STAGES = ("generate", "sft", "dpo", "evaluate", "export")
TOP_KEYS = {"name", "run_dir", "seed", "threads", "deterministic", "base_model", "serve", *STAGES}
LAUNCHERS = ("in-process", "python", "torchrun", "deepspeed")
LAUNCH_KEYS = {"launcher", "num_gpus"}  # sft and dpo: how the training starts, not a flag of the script
# flags the run sets itself: a stage writes into its own folder, and the data flows from the stage before
RUN_OWNED = {"generate": {"output_dir", "export_alpaca"}, "sft": {"output_dir"}, "dpo": {"output_dir"}}
EVALUATE_KEYS = {
    "eval_set": "Alpaca rows with references (default data/sample_eval.json)",
    "max_rows": "answer only the first N rows",
    "max_tokens": "new tokens per answer (default 128)",
    "batch_size": "answers decoded together (default 8)",
    "baseline": "the model compared against (default: base_model)",
    "judge_url": "an OpenAI-compatible judge's base URL: adds the win rate against the baseline",
    "judge_model": "the judge's model name",
    "judge_api_key": "the judge's API key (default $OPENAI_API_KEY)",
}
EXPORT_KEYS = {"outtypes": "GGUF weight types (default [q8_0])", "modelfile": "write an Ollama Modelfile (true)"}


def load(path):
    """The recipe as a dict, checked: a UsageError listing every problem, before anything runs."""
    recipe = cli.read_config(path)
    problems = check(recipe, path)
    if problems:
        raise cli.UsageError(f"recipe {path}:\n  " + "\n  ".join(problems))
    return recipe


def stage_flags(stage):
    """The flag names a stage's section may use: the script's own, plus the launcher's."""
    if stage == "generate":
        from alpaca_trainml.self_instruct.generate import generate_instruction_following_data

        return set(inspect.signature(generate_instruction_following_data).parameters) - RUN_OWNED[stage]
    if stage in ("sft", "dpo"):
        return parser_flags(stage) - RUN_OWNED[stage] | LAUNCH_KEYS
    return set(EVALUATE_KEYS if stage == "evaluate" else EXPORT_KEYS)


def parser_flags(stage):
    """train.py's (sft) or train_dpo.py's (dpo) flag names, legacy names included."""
    if stage == "sft":
        from alpaca_trainml.training.arguments import ARGUMENT_CLASSES, LEGACY_CONFIG_KEYS, ArgumentParser
    else:
        from alpaca_trainml.training.arguments import LEGACY_CONFIG_KEYS, ArgumentParser
        from alpaca_trainml.training.dpo_arguments import ARGUMENT_CLASSES
    parser = ArgumentParser(ARGUMENT_CLASSES)
    names = {o.lstrip("-") for action in parser._actions for o in action.option_strings}
    return names - {"h", "help"} | set(LEGACY_CONFIG_KEYS) | ({"model_max_length"} if stage == "dpo" else set())


def check(recipe, path="recipe"):
    """Every problem in a recipe, as lines (empty: none)."""
    problems = [f"unknown section {k!r}{cli.closest(k, sorted(TOP_KEYS))}" for k in recipe if k not in TOP_KEYS]
    if not any(stage in recipe for stage in STAGES):
        problems.append(f"no stage: give at least one of {', '.join(STAGES)}")
    for key in ("seed", "threads"):
        if key in recipe and not cli.integer(recipe[key], 0 if key == "seed" else 1):
            problems.append(f"{key}: expected an integer{' of at least 1' if key == 'threads' else ''}")
    for stage in STAGES:
        section = recipe.get(stage)
        if stage not in recipe:
            continue
        if not isinstance(section, dict):
            problems.append(f"{stage}: expected a mapping of flags to values, got {section!r}")
            continue
        known = stage_flags(stage)
        for key in section:
            if key in RUN_OWNED.get(stage, ()):
                problems.append(f"{stage}.{key}: set by the run (each stage writes into RUN_DIR/{stage})")
            elif key not in known:
                problems.append(f"{stage}: unknown key {key!r}{cli.closest(key, sorted(known))}")
        problems += check_values(stage, section)
    return problems


def check_values(stage, section):
    problems = []
    if stage in ("sft", "dpo"):
        launcher = section.get("launcher", "in-process")
        if launcher not in LAUNCHERS:
            problems.append(f"{stage}.launcher: {launcher!r}; expected one of {', '.join(LAUNCHERS)}")
        if not cli.integer(section.get("num_gpus", 1), 1):
            problems.append(f"{stage}.num_gpus: expected an integer of at least 1")
    if stage == "evaluate":
        for key in ("max_rows", "max_tokens", "batch_size"):
            if section.get(key) is not None and not cli.integer(section[key], 1):
                problems.append(f"evaluate.{key}: expected an integer of at least 1")
        if section.get("judge_url") and not section.get("judge_model"):
            problems.append("evaluate.judge_url needs evaluate.judge_model (the judge's model name)")
    if stage == "export":
        from alpaca_trainml.export.quantize import OUTTYPES

        types = section.get("outtypes", ["q8_0"])
        bad = [t for t in (types if isinstance(types, list) else [types]) if t not in OUTTYPES]
        if bad or not isinstance(types, list):
            problems.append(f"export.outtypes: {types!r}; expected a list of {', '.join(OUTTYPES)}")
    return problems


def run_dir(recipe, path, override=None):
    """The run folder: --run_dir, else the recipe's run_dir, else out/<recipe file's stem>."""
    return Path(override or recipe.get("run_dir") or Path("out") / Path(path).stem)
