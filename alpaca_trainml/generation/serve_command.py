"""serve.py's command line (also `alpaca serve`): load a checkpoint and serve it over HTTP until SIGTERM."""

import os
from pathlib import Path

from alpaca_trainml import cli
from alpaca_trainml.checkpoints import adapters
from alpaca_trainml.generation.http_guard import DEFAULT_MAX_BODY_BYTES
from alpaca_trainml.generation.lora_adapters import parse_module
from alpaca_trainml.generation.prefix_cache import DEFAULT_MB
from alpaca_trainml.generation.prefix_cache import HELP as PREFIX_CACHE_HELP
from alpaca_trainml.generation.server import bind_socket, build_server
from alpaca_trainml.generation.speculative import MODES, SPECULATIVE_HELP
from alpaca_trainml.models import EMBEDDED_MODEL, check_checkpoint
from alpaca_trainml.precision import DTYPE_CHOICES, DTYPE_HELP

DESCRIPTION = "Serve a checkpoint over HTTP: the fork's trainML route, an OpenAI-compatible API and the web UI."


def main(args):
    """Check the checkpoint, take the port, then load the model and serve until SIGTERM. A missing or incomplete
    checkpoint and a port in use are each a cli.UsageError before the model loads; a broken one, when it loads."""
    name = args.model_name_or_path or os.environ.get("TRAINML_CHECKPOINT_PATH") or EMBEDDED_MODEL
    check_checkpoint(name)
    cli.check_flags([("prefix_cache_mb", args.prefix_cache_mb, args.prefix_cache_mb >= 0, "0 (off) or more MiB")])
    if args.dtype == "int8" and (args.lora_modules or args.allow_runtime_lora_updating):
        raise cli.UsageError(
            "--dtype int8 serves no LoRA adapters (their pairs would meet packed int8 weights): merge the adapter "
            "(weight_diff.py merge_lora) and serve the merged folder with --dtype int8, or serve float32/bfloat16"
        )
    for spec in args.lora_modules or []:  # before the model loads: a wrong folder fails in a second
        module = parse_module(spec)
        if not adapters.is_adapter(Path(module["path"]).expanduser()):
            raise cli.UsageError(f"--lora_modules {spec!r}: {module['path']} is not a LoRA adapter folder")
    sock = bind_socket(args.host, args.port)  # before the model loads: a port in use fails in a second, not minutes
    try:
        server = build_server(args)
    except cli.UsageError:  # an adapter that does not fit the base: its own message
        sock.close()
        raise
    except (OSError, ValueError) as e:  # a broken checkpoint, an unknown hub id: say which, without a traceback
        sock.close()
        raise cli.UsageError(f"could not load the model {name!r}: {e}") from e
    server.run(sockets=[sock])


def parse_args(argv=None, prog=None):
    """The flags; argv may start with a YAML or JSON config file (cli.ArgumentParser reads it)."""
    p = cli.ArgumentParser(prog=prog, description=DESCRIPTION)
    p.add_argument(
        "--model_name_or_path", default=None, help=f"default: $TRAINML_CHECKPOINT_PATH, else {EMBEDDED_MODEL}"
    )
    p.add_argument("--base_model", default=None, help="the base of a LoRA adapter folder (default: its own record)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface (use --api_key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /instruct and /v1/*")
    p.add_argument(
        "--served_model_name",
        default=None,
        help="the model name the OpenAI routes answer to (default: --model_name_or_path as given)",
    )
    p.add_argument(
        "--max_prompt_tokens",
        type=int,
        default=None,
        help="the training length: /instruct's prompt limit, and a warning past it on the OpenAI routes "
        "(default: the tokenizer's model_max_length, else 512)",
    )
    p.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together, at most")
    p.add_argument(
        "--max_model_len",
        type=int,
        default=None,
        help="the context window served, at most the model's (default: the model's): prompt and max_tokens must "
        "fit it, as vLLM's --max-model-len",
    )
    p.add_argument(
        "--allowed_origins",
        nargs="*",
        default=[],
        help="web pages (origins such as https://app.example) allowed to call the API besides this server's own "
        "and loopback ones; '*' allows every page",
    )
    p.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger request bodies get 413")
    p.add_argument("--log_level", default="info")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--speculative", default=None, choices=MODES, help=SPECULATIVE_HELP)
    p.add_argument("--prefix_cache_mb", type=int, default=DEFAULT_MB, help=PREFIX_CACHE_HELP)
    p.add_argument(
        "--lora_modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters served beside the base, each chosen by requests whose `model` is its NAME, as vLLM's "
        '--lora-modules (also its JSON form \'{"name": ..., "path": ..., "base_model_name": ...}\')',
    )
    p.add_argument(
        "--allow_runtime_lora_updating",
        action="store_true",
        help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING); "
        "they read folders on this server named by the client",
    )
    return p.parse_args(argv)
