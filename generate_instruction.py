"""Generate Alpaca-style instruction data from seed tasks with any OpenAI-compatible model (Self-Instruct, as Alpaca).

    export OPENAI_API_KEY=sk-...
    python -m generate_instruction generate_instruction_following_data --output_dir out/gen \
        --num_instructions_to_generate 100 --export_alpaca out/gen/alpaca_data.json

    # any OpenAI-compatible server: vLLM, llama.cpp, Ollama, `transformers serve`, or this repo's serve.py
    python -m generate_instruction generate_instruction_following_data --base_url http://127.0.0.1:8000/v1 \
        --model_name my-model --api chat --max_workers 4 --max_tokens 1024 --output_dir out/gen

    python -m generate_instruction export_alpaca --regen_path out/gen/regen.json --out_path alpaca_data.json

output_dir/regen.json is rewritten atomically after every request; rerunning the same command resumes from it.
"""

import logging

from alpaca_trainml.cli import run_fire
from alpaca_trainml.self_instruct.generate import export_alpaca, generate_instruction_following_data

__all__ = ["generate_instruction_following_data", "export_alpaca", "main"]
COMMANDS = {"generate_instruction_following_data": generate_instruction_following_data, "export_alpaca": export_alpaca}


def main(argv=None):
    """The command line: an unknown command or flag, or a bad option or file, is one line and exit status 2."""
    return run_fire(COMMANDS, "generate_instruction.py", argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # one line per HTTP call would bury ours (openai 3 logs through httpx2)
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
