"""The fixed texts every prompt style builds on: the original Alpaca prompt, byte for byte, and the key under which a
checkpoint records its prompt style. No tokenizer here; prompts.py holds the styles themselves."""

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

STYLE_KEY = "prompt_style"  # the tokenizer_config.json key that names a checkpoint's style


def format_prompt(instruction, input=None):
    """The Alpaca prompt for one example; an empty or missing input picks the no-input template."""
    if input:
        return PROMPT_DICT["prompt_input"].format_map({"instruction": instruction, "input": input})
    return PROMPT_DICT["prompt_no_input"].format_map({"instruction": instruction})
