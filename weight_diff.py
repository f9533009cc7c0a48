"""Publish a fine-tune as a weight diff against its base model, and recover it, tensor by tensor.

    python weight_diff.py make_diff --path_raw llama-7b --path_tuned out --path_diff out-diff
    python weight_diff.py recover --path_raw llama-7b --path_diff alpaca-7b-wdiff --path_tuned alpaca-7b
    python weight_diff.py recover --path_raw R --path_diff D --path_tuned T --test_inference False
    python weight_diff.py merge_lora --path_raw llama-7b --path_adapter out-lora --path_tuned alpaca-lora-7b

The diff is tuned - raw in fp32, with a sha256 per tensor that recover checks; neither side ever holds a whole model
(alpaca_trainml/checkpoints/weight_diff.py says how).
"""

import logging
from functools import partial

from alpaca_trainml.checkpoints import weight_diff
from alpaca_trainml.checkpoints.weight_diff import make_diff, merge_lora
from alpaca_trainml.cli import run_fire
from alpaca_trainml.generation.model import sample_completion

# recover's --test_inference generation runs through InstructModel (the checkpoint tools sit below generation/)
recover = partial(weight_diff.recover, sample=sample_completion)

__all__ = ["make_diff", "recover", "merge_lora", "main"]
COMMANDS = {"make_diff": make_diff, "recover": recover, "merge_lora": merge_lora}


def main(argv=None):
    """The command line: an unknown command or flag, or a missing folder, is one line and exit status 2."""
    return run_fire(COMMANDS, "weight_diff.py", argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
