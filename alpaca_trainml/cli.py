"""How every script answers a user's mistake: `script.py: error: <what is wrong>` on stderr and exit status 2, the
convention argparse uses; any other exception is a bug and keeps its traceback.

The code that reads what the user gave (flags, files, folders, rows) raises UsageError; the scripts' entry points
(run, run_fire) print only that one plainly. fire passes an unknown `--flag` to a function with **kwargs, and
otherwise may ignore it or fail deep inside; a misspelled `--num_instructions_to_generat 7` once ran the default 100
requests against a paid API. run_fire checks the command and every flag against the function's signature first.
"""

import argparse
import contextlib
import difflib
import inspect
import json
import sys

FIRE_HELP = {"help", "h"}  # fire's own --help, which prints the usage
USAGE_EXIT = 2  # argparse's exit status for a usage error


class UsageError(ValueError):
    """A mistake in what the user gave; the message says what and where, and the scripts print it without a traceback.

    A ValueError, so callers of instruct() and the other functions that catch ValueError still catch it."""


UserError = UsageError  # the earlier name, kept for the code that still raises it


@contextlib.contextmanager
def user_errors():
    """ValueError and OSError raised in this block come from the user's input: re-raise them as UsageError."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e


def closest(name, known):
    """' (did you mean X?)' for the closest known spelling of name, or ''."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def misspelled_fields(row, known):
    """["unknown field 'outptu' (did you mean output?)"] for each key of a data row that is not a known field but is
    close to a known one the row lacks. Other extra keys (an id, a category) are left alone."""
    absent = [k for k in known if k not in row]
    return [f"unknown field {key!r}{closest(key, absent)}" for key in row if key not in known and closest(key, absent)]


def unknown_flags_error(unknown, known):
    """UsageError naming each unknown flag, with the closest known spelling where there is one."""
    flags = [a for a in unknown if a.startswith("-")]
    if not flags:
        return UsageError(f"unexpected value(s) with no flag before them: {' '.join(unknown)}; see --help")
    parts = [flag + closest(flag.split("=", 1)[0], known) for flag in flags]
    return UsageError(f"unknown flag(s): {', '.join(parts)}; see --help")


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts, but a misspelled --flag is named with the closest real one, and before anything
    else: plain argparse answers `--instrucion Hi` with only "the following arguments are required: --instruction".
    A config file may come first (expand_config): `serve.py serve.yaml --port 8001`."""

    def add_argument(self, *names, **kwargs):
        action = super().add_argument(*names, **kwargs)
        # the --flags, as added (argparse's own --help is added first, from its __init__)
        self.long_flags = [*getattr(self, "long_flags", []), *(o for o in action.option_strings if o.startswith("--"))]
        return action

    def parse_known_args(self, args=None, namespace=None):
        try:  # a leading YAML or JSON config file gives the flags; the flags after it override it
            args = expand_config(list(sys.argv[1:] if args is None else args), self)
        except UsageError as e:
            self.error(str(e))
        known = getattr(self, "long_flags", [])
        unknown = []
        for arg in args:
            if arg == "--":  # what follows is values, not flags
                break
            flag = arg.split("=", 1)[0]
            # argparse takes a unique prefix of a flag (--instr for --instruction): so do we
            if flag.startswith("--") and len(flag) > 2 and not any(k.startswith(flag) for k in known):
                unknown.append(arg)
        if unknown:
            self.error(str(unknown_flags_error(unknown, known)))
        return super().parse_known_args(args, namespace)


def exit_usage(prog, error):
    """Print `prog: error: <error>` on stderr and exit with status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT)


def run(prog, main, *args):
    """main(*args); a UsageError is printed as `prog: error: message` with exit status 2, anything else propagates."""
    try:
        return main(*args)
    except UsageError as e:
        exit_usage(prog, e)


def command_flags(fn):
    """The --flag names fn accepts."""
    return [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def flag_names(args):
    """The names of the --flags in args, as fire reads them (--a-b is --a_b; --noflag is --flag=False).
    Arguments after a bare '--' are fire's own (e.g. `-- --help`) and are not ours to check."""
    names = []
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            names.append(arg[2:].split("=", 1)[0].replace("-", "_"))
    return names


def unknown_flags_message(command, fn, args):
    """None when every flag in args is one fn takes; otherwise the message naming each unknown one."""
    valid = command_flags(fn)
    unknown = [
        n for n in flag_names(args) if n not in valid and n not in FIRE_HELP and n.removeprefix("no") not in valid
    ]
    if not unknown:
        return None
    lines = [f"unknown flag --{name}" + closest(f"--{name}", [f"--{v}" for v in valid]) for name in unknown]
    return f"{command}: " + "; ".join(lines) + "\nvalid flags: " + " ".join(f"--{v}" for v in valid)


def run_fire(commands, prog, argv=None):
    """fire.Fire(commands) on argv (default sys.argv[1:]), after checking the command and its flags.

    commands: {name: function}. An unknown command or flag, and a UsageError from the command, exit with status 2 and
    `prog: error: ...`; any other exception keeps its traceback."""
    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        fire.Fire(commands, command=args, name=prog)  # fire's own listing of the commands
        return None
    if args[0] not in commands:
        exit_usage(prog, f"unknown command {args[0]!r}; expected one of: {', '.join(commands)}")
    try:
        args = expand_fire_config(args, commands[args[0]])
    except UsageError as e:
        exit_usage(prog, e)
    message = unknown_flags_message(args[0], commands[args[0]], args[1:])
    if message:
        exit_usage(prog, message)
    return run(prog, fire.Fire, commands, args, prog)


def integer(x, low=None, high=None):
    """x is an int (not a bool) within [low, high]."""
    return isinstance(x, int) and not isinstance(x, bool) and (low is None or x >= low) and (high is None or x <= high)


def number(x, low=None, high=None):
    """x is an int or float (not a bool) within [low, high]."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool)
    return ok and (low is None or x >= low) and (high is None or x <= high)


def check_flags(checks, problems=()):
    """Raise one UsageError listing every flag whose value is wrong.

    checks: [(flag, value, ok, expected)], e.g. ("max_workers", 0, integer(0, 1), "an integer of at least 1");
    problems: messages found elsewhere, reported with these."""
    found = [*problems, *(f"--{flag} {value!r}: expected {expected}" for flag, value, ok, expected in checks if not ok)]
    if found:
        raise UsageError("invalid options:\n  " + "\n  ".join(found))


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def is_config_file(arg):
    """Whether a command-line argument names a config file (YAML or JSON) rather than a flag or a value."""
    return isinstance(arg, str) and not arg.startswith("-") and arg.lower().endswith(CONFIG_SUFFIXES)


def read_config(path):
    """{flag name: value} from a YAML or JSON file; a missing file, a parse error or a non-mapping is a UsageError."""
    import yaml  # YAML is a superset of JSON: one reader for both

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as e:
        raise UsageError(f"config file {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path}: not valid YAML/JSON: {str(e).splitlines()[0]}") from e
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError(f"config file {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def unknown_keys_error(path, unknown, known):
    """The one-line error for keys of a config file that are no flag, with the closest flag where there is one."""
    parts = [key + closest(key, known) for key in unknown]
    return UsageError(f"config file {path}: unknown key(s): {', '.join(parts)}; see --help")


def _action_argv(action, value):
    """The argv that gives an argparse action this value (a list gives one value per item; true/false for a switch)."""
    if action.nargs == 0:  # store_true / store_false / store_const
        wanted = action.const if action.const is not None else True
        return [action.option_strings[0]] if value == wanted else []
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = [v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict) else str(v) for v in values]
    return texts if not action.option_strings else [action.option_strings[0], *texts]


def expand_config(argv, parser, aliases=()):
    """argv with a leading config file (YAML or JSON, keys = the parser's flag names) replaced by its flags, so that
    the flags written after it on the command line override it (argparse keeps the last value given).

    `train.py cfg.yaml --learning_rate 1e-4` reads as `train.py --<every key of cfg.yaml> ... --learning_rate 1e-4`.
    A key that is no flag is a UsageError naming it, with the closest flag. Keys whose value is null are left out.
    aliases: other flag names the caller translates itself (the seed's removed flags), passed on as `--name value`."""
    argv = list(argv)
    if not argv or not is_config_file(argv[0]):
        return argv
    path, rest = argv[0], argv[1:]
    actions = {}
    for action in parser._actions:  # argparse has no public list of its actions
        for option in action.option_strings or [action.dest]:
            actions.setdefault(option.lstrip("-"), action)
            actions.setdefault(option.lstrip("-").replace("-", "_"), action)  # --dry-run: the key dry_run
    config = read_config(path)
    unknown = [k for k in config if k not in aliases and (k not in actions or actions[k].dest == "help")]
    if unknown:
        raise unknown_keys_error(path, unknown, sorted(k for k in actions if k != "help"))
    positional, flags = [], []
    for key, value in config.items():
        if key in aliases and value is not None:
            flags += [f"--{key}", str(value)]
        elif value is not None:
            (flags if actions[key].option_strings else positional).extend(_action_argv(actions[key], value))
    return positional + flags + rest


def expand_fire_config(args, fn):
    """run_fire's argv (command first) with a config file after the command replaced by --key=value flags (Python
    literals, which fire reads back as the same values), before the flags that follow it on the command line."""
    if len(args) < 2 or not is_config_file(args[1]):
        return args
    path = args[1]
    config = read_config(path)
    valid = command_flags(fn)
    unknown = [k for k in config if k not in valid]
    if unknown:
        raise unknown_keys_error(path, unknown, valid)
    return [args[0], *(f"--{k}={v!r}" for k, v in config.items()), *args[2:]]
