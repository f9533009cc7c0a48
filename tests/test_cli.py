"""cli.run_fire: an unknown command or flag is refused, with one message naming it and the valid ones, before the
command runs; a ValueError from the command is one line, not a traceback. Then the repo's fire CLIs, for real."""

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
        raise ValueError(f"--times {times}: expected at least 0")
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
    assert "prog greet: unknown flag --nmae (did you mean --name?)" in err
    assert "valid flags: --name --times --loud" in err


def test_an_unknown_command_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_fire(COMMANDS, "prog", ["gret"])
    assert exit_info.value.code == 2 and "unknown command 'gret'; expected one of: greet" in capsys.readouterr().err


def test_a_value_error_from_the_command_is_one_line():
    with pytest.raises(SystemExit) as exit_info:
        run_fire(COMMANDS, "prog", ["greet", "--times", "-1"])
    assert exit_info.value.code == "prog: error: --times -1: expected at least 0"  # SystemExit(str): printed, status 1


def test_check_flags_lists_every_bad_value():
    assert integer(3, 1) and not integer(True) and not integer(2.0) and not integer(0, 1) and integer(5, 1, 5)
    assert number(0.5, 0, 1) and number(1, 0, 1) and not number("1") and not number(False)
    with pytest.raises(ValueError) as err:
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


def test_run_prints_one_line_and_exits_non_zero():
    def main(path):
        raise cli.UserError(f"{path}: no such folder")

    with pytest.raises(SystemExit) as exc:
        cli.run("x.py", main, "out/model")
    assert exc.value.code == "x.py: error: out/model: no such folder"  # sys.exit(str) prints it, exits 1
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

    with pytest.raises(SystemExit):  # the dict weight_diff.py's __main__ runs; nothing is read or written
        run_fire(
            {"make_diff": weight_diff.make_diff, "recover": weight_diff.recover},
            "weight_diff.py",
            ["recover", "--path_raw", "a", "--path_dif", "b"],
        )
    assert "unknown flag --path_dif (did you mean --path_diff?)" in capsys.readouterr().err
