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

from alpaca_trainml import cli
from alpaca_trainml.generation.serve_command import main, parse_args
from alpaca_trainml.generation.server import ServerThread, build_server, create_app

__all__ = ["create_app", "build_server", "ServerThread", "main", "parse_args"]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.run("serve.py", main, parse_args())
