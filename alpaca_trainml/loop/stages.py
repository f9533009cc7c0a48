"""The stages of a recipe. Each has resolve(ctx) -> (config, inputs): the flags it will run with, as the manifest
records them, and the files it reads; and execute(ctx, config, out) -> metrics, which writes into the folder out
(a temporary one, renamed by the runner once the stage succeeds).

The data flows down the stages: generate's alpaca_data.json is sft's default data, sft's model is dpo's, and
evaluate and export take the last model trained (the base model when no stage trains)."""

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from alpaca_trainml import REPO_ROOT, jsonio
from alpaca_trainml.loop.recipe import LAUNCH_KEYS
from alpaca_trainml.models import EMBEDDED_MODEL

logger = logging.getLogger(__name__)
RUN_DIR = "RUN_DIR"  # how the manifest writes the run folder, so that moving the folder changes no fingerprint


@dataclass
class Context:
    recipe: dict
    run_dir: Path
    seed: int

    @property
    def base_model(self):
        return self.recipe.get("base_model") or EMBEDDED_MODEL

    def final_model(self):
        """The model the later stages take: dpo's, else sft's, else the base."""
        for stage in ("dpo", "sft"):
            if stage in self.recipe:
                return str(self.run_dir / stage)
        return self.base_model


def file_inputs(config, run_dir):
    """The flag values that name an existing file or folder (comma-separated lists too): the stage's inputs. Those
    inside the run folder are left out: the stage before, whose fingerprint is chained into this one, made them."""
    found = []
    for value in config.values():
        for part in str(value).split(",") if isinstance(value, (str, Path)) else ():
            if part and Path(part).exists() and not Path(part).resolve().is_relative_to(run_dir.resolve()):
                found.append(part)
    return found


def shown(config, ctx):
    """The config as the manifest keeps it: paths inside the run folder written from RUN_DIR."""
    prefix = str(ctx.run_dir)
    return {k: (RUN_DIR + str(v)[len(prefix) :] if str(v).startswith(prefix) else v) for k, v in config.items()}


# generate: self-instruct against an OpenAI-compatible teacher


def resolve_generate(ctx):
    from alpaca_trainml.self_instruct.prompting import SEED_TASKS_PATH

    config = {"seed": ctx.seed, "seed_tasks_path": str(SEED_TASKS_PATH), **ctx.recipe["generate"]}
    return config, [*file_inputs(config, ctx.run_dir), str(REPO_ROOT / "prompt.txt")]


def execute_generate(ctx, config, out):
    from alpaca_trainml.self_instruct.generate import generate_instruction_following_data, load_regen

    # regen.json in the temporary folder survives a kill: rerunning resumes the requests from it
    generate_instruction_following_data(output_dir=str(out), export_alpaca=str(out / "alpaca_data.json"), **config)
    return {"instructions": len(load_regen(out / "regen.json"))}


# sft and dpo: train.py and train_dpo.py, in this process or under a launcher


def resolve_training(ctx, stage):
    section = dict(ctx.recipe[stage])
    if stage == "sft":
        default_data = str(ctx.run_dir / "generate" / "alpaca_data.json") if "generate" in ctx.recipe else None
        default_model = ctx.base_model
    else:
        default_data = None
        default_model = str(ctx.run_dir / "sft") if "sft" in ctx.recipe else ctx.base_model
    flags = {"model_name_or_path": default_model, "seed": ctx.seed, "report_to": "none", "save_strategy": "no"}
    if default_data:
        flags["data_path"] = default_data
    if ctx.recipe.get("deterministic"):
        flags["full_determinism"] = True  # transformers' switch: deterministic kernels, seeded workers
    flags.update({k: v for k, v in section.items() if k not in LAUNCH_KEYS})
    config = {"launcher": section.get("launcher", "in-process"), "num_gpus": section.get("num_gpus", 1), **flags}
    return config, file_inputs(flags, ctx.run_dir)


def launch_command(launcher, num_gpus, command, flags_file):
    """The command that runs `alpaca <command> FLAGS_FILE` under the launcher (None: in this process)."""
    module = [command, str(flags_file)]
    if launcher == "python":
        return [sys.executable, "-m", "alpaca_trainml.loop", *module]
    if launcher == "torchrun":
        return ["torchrun", f"--nproc_per_node={num_gpus}", "-m", "alpaca_trainml.loop", *module]
    if launcher == "deepspeed":
        return ["deepspeed", f"--num_gpus={num_gpus}", "--module", "alpaca_trainml.loop", *module]
    return None


def execute_training(ctx, config, out, stage):
    """Write the flags to a config file beside the stage's folder and run train.py's (or train_dpo.py's) code on it:
    `alpaca train FILE`, the same path as `python train.py FILE`."""
    flags = {k: v for k, v in config.items() if k not in LAUNCH_KEYS}
    flags["output_dir"] = str(out)
    flags_file = ctx.run_dir / f".{stage}.flags.json"
    jsonio.jdump(flags, flags_file)
    command = launch_command(config["launcher"], config["num_gpus"], "train" if stage == "sft" else "dpo", flags_file)
    if command is None:
        if stage == "sft":
            from alpaca_trainml.training.sft import train

            train([str(flags_file)])
        else:
            from alpaca_trainml.training.dpo import train_dpo

            train_dpo([str(flags_file)])
    else:
        logger.info("%s: %s", stage, " ".join(command))
        code = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}).returncode
        if code:
            raise RuntimeError(f"{command[0]} exited with status {code}")
    state = out / "trainer_state.json"
    history = jsonio.jload(state)["log_history"] if state.is_file() else []
    losses = [row["loss"] for row in history if "loss" in row]
    return {"first_loss": losses[0], "last_loss": losses[-1]} if losses else {}


# evaluate: the held-out loss, ROUGE-L against the references, and a judge's win rate when one is given


def resolve_evaluate(ctx):
    section = ctx.recipe["evaluate"]
    config = {
        "eval_set": str(REPO_ROOT / "data" / "sample_eval.json"),
        "max_rows": None,
        "max_tokens": 128,
        "batch_size": 8,
        "baseline": ctx.base_model,
        "model": ctx.final_model(),
        **section,
    }
    config.pop("judge_api_key", None)  # a secret: never in the manifest (execute reads it from the recipe)
    return config, file_inputs(config, ctx.run_dir)


def execute_evaluate(ctx, config, out):
    from alpaca_trainml.evaluation import references
    from alpaca_trainml.evaluation.commands import generate, judge

    rows = jsonio.jload(config["eval_set"])[: config["max_rows"]]
    jsonio.jdump(rows, out / "eval_set.json")  # the rows answered, as they were
    summary = {"rows": len(rows)}
    for role in ("baseline", "model"):
        answers_file = out / f"{role}_answers.json"
        generate(
            eval_set=str(out / "eval_set.json"),
            output=str(answers_file),
            model_name_or_path=config[role],
            generator=role,  # not the folder's name: the file must not depend on where the run lives
            max_tokens=config["max_tokens"],
            batch_size=config["batch_size"],
            temperature=0.0,  # greedy: the same answers on every run
        )
        answers = [row["output"] for row in jsonio.jload(answers_file)]
        summary[f"{role}_loss"] = references.heldout_loss(config[role], out / "eval_set.json")
        summary[f"{role}_rouge_l"] = references.mean(references.rouge_l(answers, [r["output"] for r in rows]))
    if config.get("judge_url"):
        api_key = ctx.recipe["evaluate"].get("judge_api_key") or os.environ.get("OPENAI_API_KEY") or "none"
        judge(
            model_outputs=str(out / "model_answers.json"),
            reference_outputs=str(out / "baseline_answers.json"),
            judge_model=config["judge_model"],
            output_dir=str(out / "judge"),
            base_url=config["judge_url"],
            api_key=api_key,
            seed=ctx.seed,
        )
        from alpaca_trainml.evaluation.judging import summarize

        scores = summarize(jsonio.jload(out / "judge" / "annotations.json"))
        summary.update({f"judge_{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
    jsonio.jdump(summary, out / "summary.json")
    return summary


# export: GGUF files for llama.cpp and Ollama, and the Modelfile


def resolve_export(ctx):
    config = {"model": ctx.final_model(), "outtypes": ["q8_0"], "modelfile": True, **ctx.recipe["export"]}
    return config, []


def execute_export(ctx, config, out):
    """A GGUF file per type; the Modelfile (export_gguf.py --modelfile: the checkpoint's prompt style as a Go template
    and its stop strings) FROM the first one."""
    from alpaca_trainml.export.gguf import export
    from alpaca_trainml.models import resolve_model_path

    files = []
    for outtype in config["outtypes"]:
        path = out / f"model-{outtype}.gguf"
        modelfile = out / "Modelfile" if config["modelfile"] and not files else None
        export(resolve_model_path(config["model"]), path, outtype, modelfile_path=modelfile)
        files.append(path.name)
    return {"files": files}


RESOLVE = {
    "generate": resolve_generate,
    "sft": lambda ctx: resolve_training(ctx, "sft"),
    "dpo": lambda ctx: resolve_training(ctx, "dpo"),
    "evaluate": resolve_evaluate,
    "export": resolve_export,
}
EXECUTE = {
    "generate": execute_generate,
    "sft": lambda ctx, config, out: execute_training(ctx, config, out, "sft"),
    "dpo": lambda ctx, config, out: execute_training(ctx, config, out, "dpo"),
    "evaluate": execute_evaluate,
    "export": execute_export,
}


def serve_commands(ctx):
    """The commands that serve what the run made, printed at its end."""
    model = ctx.final_model()
    lines = [f"alpaca serve --model_name_or_path {model}    # or: python serve.py --model_name_or_path {model}"]
    export_dir = ctx.run_dir / "export"
    if "export" in ctx.recipe and export_dir.is_dir():
        ggufs = sorted(export_dir.glob("*.gguf"))
        name = ctx.recipe.get("name") or ctx.run_dir.name
        if (export_dir / "Modelfile").is_file():
            lines.append(f"ollama create {name} -f {export_dir / 'Modelfile'} && ollama run {name}")
        if ggufs:
            lines.append(f"llama-server -m {ggufs[0]} --port 8080")
    return lines
