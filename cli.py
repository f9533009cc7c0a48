"""How the scripts answer a user's mistake: one line naming what is wrong and a non-zero exit, no traceback.

Tracebacks stay for bugs: only errors raised while reading what the user gave (flags, files, folders, rows) become
UserError, and only UserError is printed plainly.
"""

import contextlib
import difflib
import sys


class UserError(ValueError):
    """A mistake in what the user gave; the message says what and where, and the CLI prints it without a traceback."""


@contextlib.contextmanager
def user_errors():
    """ValueError and OSError raised in this block come from the user's input: re-raise them as UserError."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from e


def unknown_flags_error(unknown, known):
    """UserError naming each unknown flag, with the closest known spelling where there is one."""
    flags = [a for a in unknown if a.startswith("-")]
    if not flags:
        return UserError(f"unexpected value(s) with no flag before them: {' '.join(unknown)}; see --help")
    parts = []
    for flag in flags:
        close = difflib.get_close_matches(flag.split("=", 1)[0], known, n=1)
        parts.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    return UserError(f"unknown flag(s): {', '.join(parts)}; see --help")


def run(prog, main, *args):
    """main(*args), with a UserError printed as `prog: error: message` and exit status 1."""
    try:
        return main(*args)
    except UserError as e:
        sys.exit(f"{prog}: error: {e}")
