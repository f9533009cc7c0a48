"""The prompt templates Alpaca was trained with."""

# Byte for byte the templates Alpaca was trained with: "### Response:" has no trailing newline.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def format_prompt(instruction, input=None):
    """The Alpaca prompt for one example; an empty or missing input picks the no-input template."""
    if input:
        return PROMPT_DICT["prompt_input"].format_map({"instruction": instruction, "input": input})
    return PROMPT_DICT["prompt_no_input"].format_map({"instruction": instruction})
