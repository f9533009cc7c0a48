"""The ranges of the decoding settings, written once. decoding.check_params enforces them on every generation path
(InstructModel, the serving engine, serve.py's routes); the API scripts (generate_instruction.py, evaluate.py) check
their flags with the same predicates. Torch-free, so a script that only calls an API does not load torch to check
a flag."""

from alpaca_trainml.cli import number

MAX_BEAMS = 8
MAX_STOPS = 4  # as the OpenAI API
MAX_TEMPERATURE = 2  # as the OpenAI API
TEMPERATURE_RANGE = f"a number from 0 to {MAX_TEMPERATURE} (0 = greedy)"
TOP_P_RANGE = "a number above 0 and at most 1"  # 0 would keep no token at all


def temperature_ok(x):
    return number(x, 0, MAX_TEMPERATURE)


def top_p_ok(x):
    return number(x, 0, 1) and x > 0


def flag_checks(temperature, top_p):
    """cli.check_flags entries for --temperature and --top_p."""
    return [
        ("temperature", temperature, temperature_ok(temperature), TEMPERATURE_RANGE),
        ("top_p", top_p, top_p_ok(top_p), TOP_P_RANGE),
    ]
