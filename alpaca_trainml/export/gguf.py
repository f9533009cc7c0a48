"""A checkpoint (a full one, or a LoRA adapter merged onto its base first) as one GGUF file, for llama.cpp and Ollama:
the weights at f32, f16, bf16 or q8_0, the tokenizer, and the chat template and end-of-turn token of the prompt style
the checkpoint was trained in (data/prompts.py), so that llama.cpp prompts it as it was trained and stops where it
was trained to stop. write_modelfile gives Ollama the same prompt, as a Go template.

Only the Llama architecture (LlamaForCausalLM: SmolLM2, Llama 2/3 without rope scaling, TinyLlama) is covered: it
is what train.py fine-tunes here, and its GGUF layout is the one we test against llama.cpp.
"""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

from alpaca_trainml import jsonio
from alpaca_trainml.checkpoints import adapters
from alpaca_trainml.cli import UserError
from alpaca_trainml.data.ollama_template import modelfile
from alpaca_trainml.data.prompts import load_style

logger = logging.getLogger(__name__)

OUTTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
SUPPORTED = "llama (LlamaForCausalLM: SmolLM2, Llama 2/3 without rope scaling, TinyLlama)"


def check_config(config, where):
    """UserError unless this is a Llama our export writes exactly."""
    arch = (config.get("architectures") or ["?"])[0]
    if config.get("model_type") != "llama" or arch != "LlamaForCausalLM":
        raise UserError(f"{where}: architecture {arch} ({config.get('model_type')}); GGUF export supports {SUPPORTED}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    unsupported = [f"{k}={config[k]!r}" for k in ("attention_bias", "mlp_bias") if config.get(k)] + (
        [f"rope_type={rope.get('rope_type')!r}"] if rope.get("rope_type", "default") != "default" else []
    )
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={config['hidden_act']!r}")
    if unsupported:
        raise UserError(f"{where}: {', '.join(unsupported)} is not covered; GGUF export supports {SUPPORTED}")


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


def rope_permute(w, heads):
    """HF stores each head's query/key rows as two halves (rotate_half); GGUF's llama layout interleaves the pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_data(name, w, outtype):
    """(numpy data, raw dtype or None): norms and other 1-D tensors stay f32, as llama.cpp expects."""
    w = w.detach().float().cpu().numpy()
    if w.ndim == 1 or outtype == "f32":
        return w.astype(np.float32), None
    if outtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[OUTTYPES["q8_0"]][0]:
        logger.warning("%s: rows of %d do not split into q8_0 blocks; written as f16", name, w.shape[-1])
        return w.astype(np.float16), None
    if outtype == "f16":
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, OUTTYPES[outtype]), OUTTYPES[outtype]


def add_tensors(writer, model, outtype):
    c = model.config
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    tied = c.tie_word_embeddings
    for hf_name, w in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the token embedding as the output when `output` is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(
                f"{hf_name}: a tensor GGUF's llama layout has no name for; GGUF export supports {SUPPORTED}"
            )
        if hf_name.endswith("q_proj.weight"):
            w = rope_permute(w, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = rope_permute(w, c.num_key_value_heads)
        data, raw = tensor_data(hf_name, w, outtype)
        writer.add_tensor(name, data, raw_dtype=raw)


def add_hparams(writer, model, name, outtype):
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(FILE_TYPES[outtype])


def load(checkpoint, base_model, workdir):
    """(model, tokenizer, prompt style) in fp32; an adapter is merged onto its base first (lora_merge, into workdir),
    with the adapter's own tokenizer files and style."""
    if adapters.is_adapter(checkpoint):
        from alpaca_trainml.checkpoints.lora_merge import merge
        from alpaca_trainml.models import resolve_model_path

        base = resolve_model_path(adapters.base_of(checkpoint, base_model))
        check_config(read_config(base), base)  # before the merge: refuse early
        checkpoint = merge(base, checkpoint, Path(workdir) / "merged")
    check_config(read_config(checkpoint), checkpoint)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    style = load_style(tokenizer, checkpoint)
    return model, style.adopt(tokenizer), style


def export(checkpoint, out, outtype="f32", base_model=None, modelfile_path=None):
    """Write checkpoint as GGUF to `out` (atomically), and an Ollama Modelfile to modelfile_path if given; return the
    GGUF path."""
    from alpaca_trainml.export.gguf_vocab import add_tokenizer

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model, tokenizer, style = load(checkpoint, base_model, work)
        tmp = work / out.name
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        add_hparams(writer, model, Path(str(checkpoint)).name, outtype)
        add_tokenizer(writer, tokenizer, model.config.vocab_size, style.end_of_turn(tokenizer))
        add_tensors(writer, model, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
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
