"""data/prompts.py: the Alpaca templates byte for byte, and the choice between them."""

from alpaca_trainml.data.prompts import PROMPT_DICT, format_prompt


def test_the_templates_end_at_the_response_header_without_a_newline():
    for template in PROMPT_DICT.values():
        assert template.endswith("### Response:")  # the model's answer follows directly, as Alpaca trained
    assert "{input}" in PROMPT_DICT["prompt_input"] and "{input}" not in PROMPT_DICT["prompt_no_input"]


def test_format_prompt_picks_the_template_by_the_input():
    with_input = format_prompt("Sort these.", "b a")
    assert with_input.endswith("### Instruction:\nSort these.\n\n### Input:\nb a\n\n### Response:")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    for empty in (None, ""):  # no input, or an empty one: the no-input template
        assert format_prompt("Name a colour.", empty) == PROMPT_DICT["prompt_no_input"].format(
            instruction="Name a colour."
        )


def test_braces_in_the_text_are_kept_as_written():
    assert "{x} and {input}" in format_prompt("Explain {x} and {input}.")  # format_map fills the template only
