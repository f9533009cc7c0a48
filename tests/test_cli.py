"""cli: one UsageError, printed by every script as `script.py: error: ...` with exit status 2; any other exception
keeps its traceback. run_fire refuses an unknown command or flag before the command runs. Then the scripts, for real:
run as a user runs them, each mistake is one line on stderr and exit status 2."""

import subprocess
import sys

import pytest
from fake_openai import FakeOpenAI
from helpers import ROOT, subprocess_env

from alpaca_trainml import cli
from alpaca_trainml.cli import check_flags, integer, number, run_fire

CALLS = []


def greet(name="world", times=1, loud=False):
    CALLS.append((name, times, loud))
    if times < 0:
        raise cli.UsageError(f"--times {times}: expected at least 0")
    if times > 100:
        raise ValueError("a bug: a plain ValueError is not the user's mistake")
    return None


COMMANDS = {"greet": greet}


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


def test_known_flags_in_every_form_fire_takes_reach_the_command():
    run_fire(COMMANDS, "prog", ["greet", "--name", "x", "--times=2", "--noloud"])
    run_fire(COMMANDS, "prog", ["greet", "y", "--loud"])  # positional values, a bare boolean flag
    assert CALLS == [("x", 2, False), ("y", 1, True)]


def test_an_unknown_flag_is_refused_before_the_command_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_fire(COMMANDS, "prog", ["greet", "--nmae", "x", "--times", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and CALLS == []
    assert err.startswith("prog: error: greet: unknown flag --nmae (did you mean --name?)")
    assert "valid flags: --name --times --loud" in err


def test_an_unknown_command_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_fire(COMMANDS, "prog", ["gret"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == "prog: error: unknown command 'gret'; expected one of: greet\n"


def test_a_usage_error_from_the_command_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_fire(COMMANDS, "prog", ["greet", "--times", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "prog: error: --times -1: expected at least 0\n"


def test_any_other_error_from_the_command_keeps_its_traceback():
    with pytest.raises(ValueError, match="a bug"):  # not turned into an exit: the traceback shows where
        run_fire(COMMANDS, "prog", ["greet", "--times", "101"])


def test_usage_error_is_a_value_error_and_user_error_its_old_name():
    assert issubclass(cli.UsageError, ValueError) and cli.UserError is cli.UsageError


def test_check_flags_lists_every_bad_value():
    assert integer(3, 1) and not integer(True) and not integer(2.0) and not integer(0, 1) and integer(5, 1, 5)
    assert number(0.5, 0, 1) and number(1, 0, 1) and not number("1") and not number(False)
    with pytest.raises(cli.UsageError) as err:
        check_flags([("a", "x", integer("x"), "an integer"), ("b", 1, True, "-"), ("c", -1, number(-1, 0), "0+")])
    assert str(err.value) == "invalid options:\n  --a 'x': expected an integer\n  --c -1: expected 0+"


def test_value_and_os_errors_inside_user_errors_become_user_errors():
    with pytest.raises(cli.UserError, match="bad row") as exc:
        with cli.user_errors():
            raise ValueError("bad row")
    assert isinstance(exc.value.__cause__, ValueError)
    with pytest.raises(cli.UserError, match="no such file"):
        with cli.user_errors():
            raise FileNotFoundError("no such file")


def test_other_errors_stay_bugs_with_their_traceback():
    with pytest.raises(KeyError):
        with cli.user_errors():
            raise KeyError("a bug")
    with pytest.raises(KeyError):  # run() prints only UserError plainly
        cli.run("x.py", lambda: {}["missing"])


def test_run_prints_one_line_and_exits_2(capsys):
    def main(path):
        raise cli.UsageError(f"{path}: no such folder")

    with pytest.raises(SystemExit) as exc:
        cli.run("x.py", main, "out/model")
    assert exc.value.code == 2 and capsys.readouterr().err == "x.py: error: out/model: no such folder\n"
    assert cli.run("x.py", lambda a: a + 1, 1) == 2


def test_unknown_flags_name_the_closest_known_spelling():
    known = ["--num_train_epochs", "--learning_rate", "--output_dir"]
    err = cli.unknown_flags_error(["--num_train_epocs", "3", "--zzz"], known)
    assert str(err) == "unknown flag(s): --num_train_epocs (did you mean --num_train_epochs?), --zzz; see --help"
    assert "no flag before them: 3 4" in str(cli.unknown_flags_error(["3", "4"], known))


def test_generate_instruction_sends_nothing_for_a_misspelled_flag(free_port, tmp_path):
    with FakeOpenAI(free_port) as fake:
        proc = subprocess.run(
            [
                sys.executable,
                "generate_instruction.py",
                "generate_instruction_following_data",
                "--base_url",
                fake.base_url,
                "--output_dir",
                str(tmp_path),
                "--num_instructions_to_generat",
                "7",
            ],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2 and fake.log == [] and "Traceback" not in proc.stderr
    assert "unknown flag --num_instructions_to_generat (did you mean --num_instructions_to_generate?)" in proc.stderr


def test_weight_diff_commands_refuse_an_unknown_flag(capsys):
    import weight_diff

    with pytest.raises(SystemExit) as exc:  # the commands weight_diff.py's __main__ runs; nothing is read or written
        weight_diff.main(["recover", "--path_raw", "a", "--path_dif", "b"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("weight_diff.py: error: recover: unknown flag --path_dif (did you mean --path_diff?)")


def run_script(*argv, env=None):
    """`python <argv>` from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_instruction_a_bad_regen_file_is_one_line_with_exit_2(tmp_path):
    (tmp_path / "regen.json").write_text("[{")
    proc = run_script("-m", "generate_instruction", "export_alpaca", "--regen_path", tmp_path / "regen.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"generate_instruction.py: error: {tmp_path / 'regen.json'}: not")


def test_weight_diff_recover_as_the_readme_prints_it_names_a_missing_folder_with_exit_2(tmp_path):
    proc = run_script("weight_diff.py", "recover", "--path_raw", tmp_path / "llama-7b", "--path_diff", tmp_path / "d")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"weight_diff.py: error: {tmp_path / 'llama-7b'}: no such folder"


def test_inference_out_of_range_settings_are_one_line_with_exit_2():
    proc = run_script("inference.py", "--instruction", "Say hi.", "--top_p", "0", "--temperature", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # both settings on the one line, found before any model loads
    assert line.startswith("inference.py: error: temperature must be a number from 0 to 2") and "top_p" in line


def test_deploy_endpoint_without_the_sdk_says_how_to_install_it(tmp_path):
    (tmp_path / "trainml.py").write_text("raise ImportError('No module named trainml.trainml')\n")  # a broken SDK
    env = subprocess_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    proc = run_script("deploy_endpoint.py", "--checkpoint", "alpaca", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("deploy_endpoint.py: error: the trainML SDK is not installed")
    assert "pip install trainml" in line


def test_argument_parser_names_a_misspelled_flag_before_a_missing_required_one(capsys):
    p = cli.ArgumentParser(prog="x.py")
    p.add_argument("--instruction", required=True)
    p.add_argument("--max_tokens", type=int)
    assert p.parse_args(["--instr", "Hi", "--max_tokens=3"]).max_tokens == 3  # a unique prefix, as argparse takes
    assert p.parse_args(["--instruction", "Hi", "--", "--not-a-flag"][:2]).instruction == "Hi"
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--instrucion", "Hi", "--max_tokns=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "x.py: error: unknown flag(s): --instrucion (did you mean --instruction?), "
        "--max_tokns=3 (did you mean --max_tokens?); see --help"
    )


# Config files: `script.py cfg.yaml --flag v` reads cfg.yaml's keys as the flags, and the flags after it win.


def test_a_fire_config_file_gives_the_flags_and_a_flag_overrides_it(tmp_path):
    config = tmp_path / "greet.yaml"
    config.write_text("name: 'file: yes'\ntimes: 2\nloud: true\n")
    run_fire(COMMANDS, "prog", ["greet", str(config), "--times", "3"])
    assert CALLS == [("file: yes", 3, True)]  # the string survives as written; --times 3 beats the file's 2


def test_an_unknown_config_key_is_one_line_naming_the_closest_flag(tmp_path, capsys):
    config = tmp_path / "greet.json"
    config.write_text('{"nmae": "x"}')
    with pytest.raises(SystemExit) as e:
        run_fire(COMMANDS, "prog", ["greet", str(config)])
    assert e.value.code == 2 and CALLS == []
    err = capsys.readouterr().err.strip()
    assert err == f"prog: error: config file {config}: unknown key(s): nmae (did you mean name?); see --help"


def test_expand_config_for_argparse_switches_lists_positionals_and_overrides(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--tags", nargs="*", default=[])
    p.add_argument("--fast", action="store_true")
    config = tmp_path / "c.yaml"
    config.write_text("src: in.json\nrate: 0.5\ntags: [a, b]\nfast: true\n")
    args = p.parse_args(cli.expand_config([str(config), "--rate", "2"], p))
    assert (args.src, args.rate, args.tags, args.fast) == ("in.json", 2.0, ["a", "b"], True)
    config.write_text("src: in.json\nrat: 0.5\n")
    with pytest.raises(cli.UsageError, match=r"unknown key\(s\): rat \(did you mean rate\?\)"):
        cli.expand_config([str(config)], p)
    assert cli.expand_config(["--rate", "2"], p) == ["--rate", "2"]  # no config file: argv as given


@pytest.mark.parametrize("text, expected", [("[1, 2]", "expected a mapping"), ("a: [", "not valid YAML")])
def test_a_config_file_that_is_no_mapping_is_a_usage_error(tmp_path, text, expected):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(cli.UsageError, match=expected):
        cli.read_config(config)
    with pytest.raises(cli.UsageError, match="No such file"):
        cli.read_config(tmp_path / "missing.yaml")


def test_train_py_reads_a_config_file_with_the_seeds_flag_names_and_a_flag_overrides_it(tmp_path):
    from alpaca_trainml.training.arguments import parse_args

    config = tmp_path / "train.yaml"
    config.write_text("output_dir: out/x\nlearning_rate: 1.0e-4\nnum_train_epochs: 2\nevaluation_strategy: 'no'\n")
    _, data_args, training_args, notes = parse_args([str(config), "--num_train_epochs", "3"])
    assert (training_args.learning_rate, training_args.num_train_epochs) == (1e-4, 3.0)
    assert "--evaluation_strategy no is now --eval_strategy no" in notes  # the seed's name, translated as a flag is
    config.write_text("lerning_rate: 1\n")
    with pytest.raises(cli.UsageError, match=r"lerning_rate \(did you mean learning_rate\?\)"):
        parse_args([str(config)])
