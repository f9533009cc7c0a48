"""Tests of cli.py: user mistakes become one line and a non-zero exit; bugs keep their traceback."""

import pytest

import cli


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
