"""export_gguf.py's command line (also `alpaca export`): a checkpoint folder to one GGUF file, and a Modelfile."""

from alpaca_trainml import cli
from alpaca_trainml.export.gguf import export
from alpaca_trainml.export.quantize import OUTTYPES
from alpaca_trainml.models import resolve_model_path

DESCRIPTION = "Turn a checkpoint into one GGUF file for llama.cpp and Ollama: weights, tokenizer, chat template."


def main(args):
    with cli.user_errors():
        checkpoint = resolve_model_path(args.checkpoint)
    out = export(checkpoint, args.out, args.outtype, args.base_model, args.modelfile)
    print(
        f"wrote {out} ({args.outtype})"
        + (f" and {args.modelfile}: ollama create NAME -f {args.modelfile}" if args.modelfile else "")
    )


def parse_args(argv=None, prog=None):
    """The flags; argv may start with a YAML or JSON config file (cli.ArgumentParser reads it)."""
    p = cli.ArgumentParser(prog=prog, description=DESCRIPTION)
    p.add_argument("checkpoint", help="a folder train.py saved (full or LoRA adapter), or embedded:smollm2-135m")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument(
        "--outtype",
        default="f32",
        choices=list(OUTTYPES),
        help="weight type (default f32); k-quants: llama.cpp's quantizer",
    )
    p.add_argument("--base_model", default=None, help="the base of a LoRA adapter (default: its own record)")
    p.add_argument(
        "--modelfile",
        default=None,
        help="also write an Ollama Modelfile here: FROM the GGUF file, the checkpoint's prompt as a Go TEMPLATE, and "
        "its stop strings",
    )
    return p.parse_args(argv)
