"""Turn a checkpoint into one GGUF file for llama.cpp and Ollama: the weights, the tokenizer, and the chat template and
end-of-turn token of the prompt style it was trained in. A LoRA adapter folder is merged onto its base first.
--modelfile also writes an Ollama Modelfile with the same prompt (a Go template) and its stop strings.

    python export_gguf.py out/demo out/demo-f32.gguf
    python export_gguf.py out/demo-lora out/demo-lora-q8_0.gguf --outtype q8_0 --modelfile out/Modelfile
    python export_gguf.py embedded:smollm2-135m smollm2-f16.gguf --outtype f16
    python export_gguf.py out/qwen-tuned qwen-q4_k_m.gguf --outtype q4_k_m   # needs pip install '.[gguf]'

Covers llama (incl. Llama 3.1/3.2's rope), mistral, qwen2, qwen3, gemma2, gemma3 (text) and phi3; the weight types
f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 and llama.cpp's k-quants. docs/architectures.md has both tables.
"""

import logging

from alpaca_trainml import cli
from alpaca_trainml.export.command import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.run("export_gguf.py", main, parse_args())
