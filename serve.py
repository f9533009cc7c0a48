"""Serve a checkpoint over HTTP: the fork's trainML route, an OpenAI-compatible API and the web UI.

    python serve.py                                     # the embedded model, UI at http://127.0.0.1:8000
    python serve.py --model_name_or_path out/demo --port 8000 --api_key secret
    curl -s 127.0.0.1:8000/instruct -H 'Content-Type: application/json' -d '{"instruction": "Name a colour."}'
    python -m generate_instruction generate_instruction_following_data --base_url http://127.0.0.1:8000/v1 \
        --model_name embedded:smollm2-135m --api chat --output_dir out/gen

Routes: POST /instruct (body: instruction, input, max_tokens, temperature, top_p, num_beams, and our truncate
and stream; answers a JSON string, as the trainML route does), POST /v1/completions and /v1/chat/completions
(OpenAI; `stream: true` answers with server-sent events), GET /v1/models, GET /health, GET / (front-end/).

Prompts: /instruct refuses a prompt longer than the training length (--max_prompt_tokens), as the trainML route
does; the OpenAI routes take any prompt that fits the context window with max_tokens (as vLLM), and log a warning
past the training length.

Chat on an Alpaca model: the last message must be the user's and becomes the Instruction. Everything before it
becomes the Input: system and developer messages first, as written, then the earlier turns as "User: ..." and
"Assistant: ..." lines. A chat of one user message uses the no-input template (alpaca_trainml/data/chat_template.py
writes the same rule as a Jinja chat template for other servers).

One thread runs the model (alpaca_trainml/generation/engine.py): requests join the running batch at the next decoding
step, each with its own settings, and leave when done or when their client leaves. SIGTERM ends running requests
within a step. Safe by default (generation/http_guard.py): loopback only, foreign Host headers and web pages refused,
bodies bounded. The routes: alpaca_trainml/generation/routes/.
"""

import logging
import os

from alpaca_trainml import cli
from alpaca_trainml.generation.http_guard import DEFAULT_MAX_BODY_BYTES
from alpaca_trainml.generation.server import ServerThread, bind_socket, build_server, create_app
from alpaca_trainml.generation.speculative import MODES, SPECULATIVE_HELP
from alpaca_trainml.models import EMBEDDED_MODEL, check_checkpoint
from alpaca_trainml.precision import DTYPE_CHOICES, DTYPE_HELP

__all__ = ["create_app", "build_server", "ServerThread", "main", "parse_args"]


def main(args):
    """Check the checkpoint, take the port, then load the model and serve until SIGTERM. A missing or incomplete
    checkpoint and a port in use are each a cli.UsageError before the model loads; a broken one, when it loads."""
    name = args.model_name_or_path or os.environ.get("TRAINML_CHECKPOINT_PATH") or EMBEDDED_MODEL
    check_checkpoint(name)
    sock = bind_socket(args.host, args.port)  # before the model loads: a port in use fails in a second, not minutes
    try:
        server = build_server(args)
    except (OSError, ValueError) as e:  # a broken checkpoint, an unknown hub id: say which, without a traceback
        sock.close()
        raise cli.UsageError(f"could not load the model {name!r}: {e}") from e
    server.run(sockets=[sock])


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.run("serve.py", main, parse_args())
