"""alpaca_trainml/loop: the `alpaca` command, recipes, and `alpaca run` on a tiny Llama: two fresh runs give the same
weights and answers, a third skips every stage, a changed flag reruns its stage and the later ones, a failed or
killed stage leaves the earlier ones and the manifest as they were."""

import json

import pytest
import tomllib
from helpers import ROOT, make_rows

from alpaca_trainml import cli
from alpaca_trainml.loop import command, manifest, recipe, runner, stages

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_pyproject_installs_alpaca_as_a_console_script_that_lists_every_command(capsys):
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["alpaca"]
    module, function = target.split(":")
    assert (module, function) == ("alpaca_trainml.loop.command", "main") and callable(command.main)
    command.main(["--help"])
    listed = capsys.readouterr().out
    for name in ("train", "dpo", "generate", "evaluate", "export", "serve", "diff", "run"):
        assert f"\n  {name} " in listed


def test_an_unknown_command_is_one_line_with_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        command.main(["trian"])
    assert e.value.code == 2
    expected = "alpaca: error: unknown command 'trian' (did you mean train?); see alpaca --help"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.parametrize(
    "name, prefix, key",
    [
        ("train", [], "lerning_rate"),
        ("export", [], "outtyp"),
        ("serve", [], "prot"),
        ("evaluate", ["judge"], "judge_modl"),
        ("generate", ["generate_instruction_following_data"], "num_instructions_to_generat"),
        ("diff", ["recover"], "path_rw"),
    ],
)
def test_each_command_reaches_its_scripts_flags_through_a_config_file(name, prefix, key, tmp_path, capsys):
    """The error names the command and the closest flag of the script it stands for: the same parser runs."""
    config = tmp_path / "c.yaml"
    config.write_text(f"{key}: 1\n")
    with pytest.raises(SystemExit) as e:
        command.main([name, *prefix, str(config)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"alpaca {name}: error: config file {config}: unknown key(s): {key} (did you mean ")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_validates(path):
    plan = recipe.load(path)
    assert recipe.check(plan, path) == [] and any(stage in plan for stage in recipe.STAGES)


def test_a_recipe_lists_every_mistake_with_its_fix(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "sedd: 1\nsft: {lerning_rate: 1, launcher: slurm, output_dir: x}\nexport: {outtypes: [q9]}\n"
        "evaluate: {max_rows: 0, judge_url: 'http://127.0.0.1:1/v1'}\n"
    )
    with pytest.raises(cli.UsageError) as e:
        recipe.load(path)
    text = str(e.value)
    for expected in (
        "unknown section 'sedd' (did you mean seed?)",
        "sft: unknown key 'lerning_rate' (did you mean learning_rate?)",
        "sft.launcher: 'slurm'",
        "sft.output_dir: set by the run",
        "export.outtypes: ['q9']",
        "evaluate.max_rows: expected an integer of at least 1",
        "evaluate.judge_url needs evaluate.judge_model",
    ):
        assert expected in text
    assert len(text.splitlines()) == 8  # the recipe's name, then one line per problem (7)


def test_launchers_start_alpaca_under_deepspeed_and_torchrun():
    deepspeed = ["deepspeed", "--num_gpus=4", "--module", "alpaca_trainml.loop", "train", "f.json"]
    assert stages.launch_command("deepspeed", 4, "train", "f.json") == deepspeed
    torchrun = ["torchrun", "--nproc_per_node=2", "-m", "alpaca_trainml.loop", "dpo", "f.json"]
    assert stages.launch_command("torchrun", 2, "dpo", "f.json") == torchrun
    assert stages.launch_command("in-process", 1, "train", "f.json") is None


# alpaca run on the tiny Llama: sft (2 steps) -> evaluate (2 rows) -> export (f32)


@pytest.fixture
def tiny_recipe(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("ALPACA_MATVEC", "0")  # torch's matmul: the decode kernel's first build is not this test's
    data = tmp_path / "train.json"
    data.write_text(json.dumps(make_rows(16, seed=3)))
    held_out = tmp_path / "eval.json"
    held_out.write_text(json.dumps(make_rows(2, seed=4)))
    plan = {
        "seed": 7,
        "threads": 1,
        "base_model": str(tiny_llama_dir),
        "sft": {"data_path": str(data), "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3},
        "evaluate": {"eval_set": str(held_out), "max_tokens": 6, "batch_size": 2},
        "export": {"outtypes": ["f32"]},
    }
    path = tmp_path / "tiny.yaml"

    def write(**changes):
        for section, values in changes.items():
            plan[section] = {**plan.get(section, {}), **values} if isinstance(values, dict) else values
        path.write_text(json.dumps(plan))  # JSON is YAML
        return path

    write()
    return write


RECORDS = {"trainer_state.json", "training_args.bin"}


def without(files, names):
    return {k: v for k, v in files.items() if k not in names}


def weights(run_dir):
    record = manifest.load(run_dir)
    return {
        f"{stage}/{name}": sha
        for stage, entry in record["stages"].items()
        for name, sha in entry["outputs"].items()
        if name.endswith((".safetensors", ".gguf"))
    }


def test_two_fresh_runs_agree_a_third_skips_and_a_changed_flag_reruns_from_its_stage(tiny_recipe, tmp_path):
    said = []
    first = runner.run(tiny_recipe(), tmp_path / "run1", say=said.append)
    second = runner.run(tiny_recipe(), tmp_path / "run2", say=said.append)
    assert weights(tmp_path / "run1") == weights(tmp_path / "run2") != {}
    assert {"sft/model.safetensors", "export/model-f32.gguf"} <= set(weights(tmp_path / "run1"))
    answers = [json.loads((tmp_path / r / "evaluate" / "model_answers.json").read_text()) for r in ("run1", "run2")]
    assert answers[0] == answers[1] and len(answers[0]) == 2
    for stage in ("sft", "evaluate", "export"):  # the manifest's record of each stage
        entry = first["stages"][stage]
        assert entry["seed"] == 7 and entry["versions"]["torch"] and entry["device"]["kind"] in ("cpu", "cuda")
        assert entry["wall_time_s"] >= 0
        # every file agrees but the Trainer's own records: trainer_state.json (timings) and training_args.bin (a
        # pickle of the flags, output_dir included, which is inside each run's own folder)
        assert without(entry["outputs"], RECORDS) == without(second["stages"][stage]["outputs"], RECORDS)
    assert first["stages"]["evaluate"]["config"]["model"] == "RUN_DIR/sft"  # a moved run folder still matches
    said.clear()
    runner.run(tiny_recipe(), tmp_path / "run1", say=said.append)
    assert [line.split(":")[0] for line in said if "skipped" in line] == ["sft", "evaluate", "export"]
    said.clear()
    runner.run(tiny_recipe(evaluate={"max_tokens": 4}), tmp_path / "run1", say=said.append)
    assert said[0].startswith("sft: unchanged") and said[1] == "evaluate: running (changed: max_tokens)"
    assert said[3] == "export: running (an earlier stage changed)"
    said.clear()
    runner.run(tiny_recipe(evaluate={"max_tokens": 4}), tmp_path / "run1", say=said.append, rerun="evaluate")
    assert said[0].startswith("sft: unchanged") and said[1] == "evaluate: running (--rerun)"
    assert said[3] == "export: running (an earlier stage reran)"


def test_a_failed_stage_names_itself_and_a_killed_one_loses_only_itself(tiny_recipe, tmp_path, monkeypatch):
    path = tiny_recipe(evaluate={"max_tokens": 2})
    run_dir = tmp_path / "run"
    runner.run(path, run_dir, say=lambda line: None)
    before = (run_dir / "manifest.json").read_text()
    sft_files = manifest.hash_files(run_dir / "sft")

    def killed(ctx, config, out):
        (out / "half.json").write_text("{")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the stage

    monkeypatch.setitem(stages.EXECUTE, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt, match="interrupted during stage evaluate; the stages before it are kept"):
        runner.run(tiny_recipe(evaluate={"max_tokens": 3}), run_dir, say=lambda line: None)
    assert (run_dir / "manifest.json").read_text() == before and manifest.hash_files(run_dir / "sft") == sft_files
    assert not (run_dir / "evaluate" / "half.json").exists()  # the finished stage's folder is untouched

    def broken(ctx, config, out):
        raise RuntimeError("disk full\nat the end")

    monkeypatch.setitem(stages.EXECUTE, "evaluate", broken)
    with pytest.raises(runner.StageFailed) as e:
        runner.run(path := tiny_recipe(evaluate={"max_tokens": 3}), run_dir, say=lambda line: None)
    expected = f"stage evaluate failed (RuntimeError: at the end); the stages before it are kept in {run_dir}"
    assert str(e.value) == expected
    assert manifest.outputs_intact(run_dir, manifest.load(run_dir)["stages"]["sft"]) and path.exists()


# The commands docs/loop.md shows, run as printed (`alpaca` through `python -m alpaca_trainml.loop`, which is what
# the console script calls, so the test needs no reinstall), and a recipe of every stage but generate, end to end.
DOC_COMMANDS = ["alpaca --help", "alpaca run recipes/demo.yaml --check"]


def run_alpaca(command, cwd=ROOT, timeout=600):
    import subprocess
    import sys

    from helpers import subprocess_env

    argv = [sys.executable, "-m", "alpaca_trainml.loop", *command.split()[1:]]
    return subprocess.run(argv, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_documented_commands_run():
    help_run, check_run = (run_alpaca(c) for c in DOC_COMMANDS)
    assert help_run.returncode == 0 and "\n  run " in help_run.stdout
    assert check_run.returncode == 0 and check_run.stdout.strip() == "recipes/demo.yaml: ok"


@pytest.mark.slow
def test_alpaca_run_sft_under_a_launcher_then_dpo_evaluate_export(tiny_recipe, tmp_path):
    path = tiny_recipe(
        sft={"launcher": "python"},  # a process of its own: `python -m alpaca_trainml.loop train FLAGS.json`
        dpo={"data_path": str(ROOT / "data" / "sample_dpo.json"), "max_steps": 2, "per_device_train_batch_size": 4},
    )
    run = run_alpaca(f"alpaca run {path} --run_dir {tmp_path / 'run'}", timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    record = manifest.load(tmp_path / "run")
    assert list(record["stages"]) == ["sft", "dpo", "evaluate", "export"]
    assert record["stages"]["dpo"]["config"]["model_name_or_path"] == "RUN_DIR/sft"  # the data flows down
    assert record["stages"]["evaluate"]["config"]["model"] == "RUN_DIR/dpo"
    modelfile = (tmp_path / "run" / "export" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f32.gguf\n") and "ollama create" in run.stdout
    again = run_alpaca(f"alpaca run {path} --run_dir {tmp_path / 'run'}")
    assert again.stdout.count("skipped") == 4, again.stdout


@pytest.mark.slow
def test_train_py_trains_from_a_yaml_config_file(tmp_path, tiny_llama_dir):
    import subprocess
    import sys

    from helpers import subprocess_env

    data = tmp_path / "train.json"
    data.write_text(json.dumps(make_rows(8, seed=2)))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_llama_dir}\ndata_path: {data}\noutput_dir: {tmp_path / 'out'}\n"
        "max_steps: 1\nper_device_train_batch_size: 4\nreport_to: none\nsave_strategy: 'no'\n"
    )
    run = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), str(config), "--learning_rate", "1e-3"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["max_steps"] == 1 and (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] > 0
