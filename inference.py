"""Answer an instruction with an Alpaca-tuned checkpoint: the function a trainML endpoint calls, and a CLI.

    python inference.py --instruction "Name three primary colours."
    python inference.py --model_name_or_path out/demo --instruction "Summarize." --input "$(cat a.txt)" --truncate
    TRAINML_CHECKPOINT_PATH=out/demo python -c "import inference; print(inference.instruct('Name a colour.'))"

The checkpoint is --model_name_or_path (or load_model(path)), else $TRAINML_CHECKPOINT_PATH (set on trainML
endpoints), else the embedded SmolLM2-135M-Instruct. It loads on first use, once per process, on the GPU if
there is one; a LoRA adapter folder goes onto its base (or --base_model, $ALPACA_BASE_MODEL), merged.
The trainML route maps POST /instruct to instruct() here; serve.py serves the same thing locally.
"""

import logging
import threading

from alpaca_trainml import cli
from alpaca_trainml.generation.decoding import GenParams, check_params
from alpaca_trainml.generation.model import ContextLengthError, InstructModel, PromptTooLongError
from alpaca_trainml.models import EMBEDDED_MODEL
from alpaca_trainml.precision import DTYPE_CHOICES, DTYPE_HELP

__all__ = ["InstructModel", "GenParams", "PromptTooLongError", "ContextLengthError", "load_model", "instruct"]

_MODEL = None
_LOAD_LOCK = threading.Lock()


def load_model(model_name_or_path=None, max_prompt_tokens=None, dtype=None, base_model=None):
    """Load (or replace) the model instruct() uses; base_model: the base of an adapter folder."""
    global _MODEL
    with _LOAD_LOCK:
        _MODEL = InstructModel(model_name_or_path, max_prompt_tokens, dtype=dtype, base_model=base_model)
        return _MODEL


def get_model():
    """The model instruct() uses, loaded on first call."""
    global _MODEL
    with _LOAD_LOCK:
        if _MODEL is None:
            _MODEL = InstructModel()
        return _MODEL


def instruct(instruction, input=None, max_tokens=None, temperature=None, top_p=None, num_beams=None, truncate=False):
    """The answer to an instruction (and optional input), stripped, without special tokens.

    max_tokens counts new tokens. None takes the default (GenParams); the trainML route leaves unset fields out.
    Raises ValueError on an empty instruction, an out-of-range setting, or a prompt longer than the training
    length unless truncate=True."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
    given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, num_beams=num_beams)
    params = GenParams(**{k: v for k, v in given.items() if v is not None})
    model = get_model()
    check_params(params, model.context_window)
    ids = model.encode_instruction(instruction, input or None, truncate)
    return model.generate([ids], params)[0].text.strip()


def main(args):
    """Answer --instruction; a setting out of range, an empty instruction, a missing model folder or a prompt too
    long (without --truncate) is a cli.UsageError."""
    given = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams)
    # settings out of range are refused before the model loads; max_tokens' limit needs the model's window
    with cli.user_errors():
        check_params(GenParams(**{k: v for k, v in given.items() if v is not None}), max_tokens_limit=2**31)
    if not args.instruction.strip():
        raise cli.UsageError("--instruction is empty")
    load_model(args.model_name_or_path, args.max_prompt_tokens, args.dtype, args.base_model)
    try:
        answer = instruct(
            args.instruction, args.input, args.max_tokens, args.temperature, args.top_p, args.num_beams, args.truncate
        )
    except (PromptTooLongError, ContextLengthError) as e:
        raise cli.UsageError(str(e)) from e
    print(answer)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instruction", required=True)
    p.add_argument("--input", default=None)
    p.add_argument(
        "--model_name_or_path", default=None, help=f"default: $TRAINML_CHECKPOINT_PATH, else {EMBEDDED_MODEL}"
    )
    p.add_argument("--base_model", default=None, help="the base of a LoRA adapter folder (default: its own record)")
    p.add_argument("--max_tokens", type=int, default=None, help=f"new tokens (default {GenParams.max_tokens})")
    p.add_argument(
        "--temperature", type=float, default=None, help=f"0 to 2; 0 = greedy (default {GenParams.temperature})"
    )
    p.add_argument("--top_p", type=float, default=None, help=f"default {GenParams.top_p}")
    p.add_argument("--num_beams", type=int, default=None, help=f"default {GenParams.num_beams}")
    p.add_argument(
        "--max_prompt_tokens", type=int, default=None, help="default: the tokenizer's model_max_length, else 512"
    )
    p.add_argument("--truncate", action="store_true", help="cut an over-long input instead of refusing it")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.run("inference.py", main, parse_args())
