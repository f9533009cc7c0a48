"""generation/limits.py: the decoding ranges, written once. The API scripts' flags and every generation path refuse
the same values (generate_instruction.py used to take --top_p 0, evaluate.py refused below 0.001)."""

import pytest

from alpaca_trainml.cli import UsageError, check_flags
from alpaca_trainml.generation import limits
from alpaca_trainml.generation.decoding import GenParams, check_params
from alpaca_trainml.self_instruct.generate import check_options

NUMERIC = dict(request_timeout=1.0, retry_base_s=0, max_retries=0, max_workers=1, request_batch_size=1)
NUMERIC.update(max_tokens=16, num_cpus=1, num_instructions_to_generate=1)


@pytest.mark.parametrize(
    "temperature, top_p, ok",
    [(0, 1, True), (2, 0.001, True), (1.0, 0.75, True), (-0.1, 1, False), (2.01, 1, False), (1, 0, False)]
    + [(1, 1.01, False), (True, 1, False), ("1", 1, False)],
)
def test_the_scripts_and_the_generation_paths_take_the_same_values(temperature, top_p, ok):
    assert (limits.temperature_ok(temperature) and limits.top_p_ok(top_p)) == ok
    checks = []
    try:
        check_params(GenParams(temperature=temperature, top_p=top_p), max_tokens_limit=512)
    except ValueError:
        checks.append("generation")
    try:
        check_options("chat", "m", 10, 3, temperature=temperature, top_p=top_p, **NUMERIC)
    except UsageError:
        checks.append("generate_instruction")
    try:
        check_flags(limits.flag_checks(temperature, top_p))
    except UsageError:
        checks.append("flags")
    assert checks == ([] if ok else ["generation", "generate_instruction", "flags"])


def test_flag_checks_say_the_range():
    with pytest.raises(UsageError) as e:
        check_flags(limits.flag_checks(3, 0))
    assert str(e.value) == (
        "invalid options:\n  --temperature 3: expected a number from 0 to 2 (0 = greedy)"
        "\n  --top_p 0: expected a number above 0 and at most 1"
    )
