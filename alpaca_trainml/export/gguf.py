"""A checkpoint (a full one, or a LoRA adapter merged onto its base first) as one GGUF file, for llama.cpp and Ollama:
the weights (f32, f16, bf16, q8_0, q4_0 to q5_1, or llama.cpp's k-quants), the tokenizer, and the chat template and
end-of-turn token of the prompt style the checkpoint was trained in (data/prompts.py), so that llama.cpp prompts it
as it was trained and stops where it was trained to stop. write_modelfile gives Ollama the same prompt, as a Go
template.

The architectures (llama incl. llama3 rope, mistral, qwen2, qwen3, gemma2, gemma3 text, phi3) and their layouts are
in export/arch.py, the weight types in export/quantize.py and export/kquants.py; docs/architectures.md has the table.
"""

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import gguf
import torch
import transformers

from alpaca_trainml import jsonio
from alpaca_trainml.checkpoints import adapters
from alpaca_trainml.cli import UserError
from alpaca_trainml.data.ollama_template import modelfile
from alpaca_trainml.data.prompts import load_style
from alpaca_trainml.export import arch, kquants, quantize

logger = logging.getLogger(__name__)


def read_config(folder):
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise UserError(f"{folder}: no such folder; give a checkpoint folder (config.json + weights) or a LoRA adapter")
    if not path.is_file():
        raise UserError(
            f"{folder}: not a checkpoint (no config.json, no adapter_config.json); give a folder train.py saved: "
            "config.json + model.safetensors, or a LoRA adapter"
        )
    return json.loads(path.read_text())


def load(checkpoint, base_model, workdir):
    """(model, tokenizer, prompt style) in fp32; an adapter is merged onto its base first (lora_merge, into workdir),
    with the adapter's own tokenizer files and style."""
    if adapters.is_adapter(checkpoint):
        from alpaca_trainml.checkpoints.lora_merge import merge
        from alpaca_trainml.models import resolve_model_path

        base = resolve_model_path(adapters.base_of(checkpoint, base_model))
        arch.check_config(read_config(base), base)  # before the merge: refuse early
        checkpoint = merge(base, checkpoint, Path(workdir) / "merged")
    arch.check_config(read_config(checkpoint), checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    style = load_style(tokenizer, checkpoint)
    return model, style.adopt(tokenizer), style


def model_name(name, tokenizer):
    """general.name. llama.cpp's loader looks up <s>, </s>, <unk> and <|endoftext|> in any model whose name contains
    "phi3" or "phi-3", and fails when one is missing; such a name is written as "phi 3" then."""
    needed = {"<s>", "</s>", "<unk>", "<|endoftext|>"}
    if re.search(r"phi-?3", name.lower()) and not needed <= set(tokenizer.get_vocab()):
        return re.sub(r"(?i)phi-?3", "phi 3", name)
    return name


def write(model, tokenizer, path, name, outtype, end_of_turn):
    """One GGUF file: the architecture's hyperparameters, the tokenizer, then the tensors as `outtype`."""
    from alpaca_trainml.export.gguf_vocab import add_tokenizer

    spec = arch.ARCHS[model.config.model_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[spec.arch])
    writer.add_name(model_name(name, tokenizer))
    arch.add_hparams(writer, spec, model.config)
    writer.add_file_type(quantize.file_type(outtype))
    add_tokenizer(writer, tokenizer, model.config.vocab_size, end_of_turn)
    tensors = list(arch.tensors(spec, model))
    head = "output.weight" if any(n == "output.weight" for n, _ in tensors) else "token_embd.weight"
    for gguf_name, w in tensors:
        data, raw = quantize.tensor_data(gguf_name, w.detach().float().cpu().numpy(), outtype, gguf_name == head)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def export(checkpoint, out, outtype="f32", base_model=None, modelfile_path=None):
    """Write checkpoint as GGUF to `out` (atomically), and an Ollama Modelfile to modelfile_path if given; return the
    GGUF path. A k-quant is llama.cpp's quantizer run on our f16 file."""
    quantize.check_outtype(outtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model, tokenizer, style = load(checkpoint, base_model, work)
        tmp = work / out.name
        ours = kquants.SOURCE if outtype in kquants.K_QUANTS else outtype
        source = tmp if ours == outtype else work / f"source-{ours}.gguf"
        write(model, tokenizer, source, Path(str(checkpoint)).name, ours, style.end_of_turn(tokenizer))
        if ours != outtype:
            del model
            kquants.quantize(source, tmp, outtype)
        os.replace(tmp, out)
        if modelfile_path is not None:
            write_modelfile(modelfile_path, out, tokenizer, style)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def write_modelfile(path, gguf_path, tokenizer, style):
    """An Ollama Modelfile for gguf_path: its prompt style's Go template and stop strings."""
    try:
        template = style.ollama_template(tokenizer)
    except ValueError as e:
        raise UserError(f"--modelfile: {e}; the GGUF file is written, write the Modelfile TEMPLATE by hand") from e
    rel = os.path.relpath(gguf_path, Path(path).parent)
    text = modelfile(rel, template, style.stop_strings(tokenizer))
    jsonio.atomic_write(path, lambda fh: fh.write(text))
    logger.info("wrote %s (prompt style %s, stop %s)", path, style.name, style.stop_strings(tokenizer))
