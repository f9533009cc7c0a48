"""What each architecture looks like in GGUF: gguf's MODEL_ARCH for a transformers model_type, the hyperparameters
llama.cpp reads for it, and the weight transforms its graph expects.

Names come from gguf's own tables (MODEL_ARCH, TensorNameMap, the writer's Keys); the facts below (which rope layout
each architecture uses in llama.cpp, which norms carry Gemma's 1 + w, which sliding-window pattern llama.cpp assumes)
are those of llama.cpp's converter and model loader.
"""

import logging
from dataclasses import dataclass

import gguf
import torch

from alpaca_trainml.cli import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """One architecture's GGUF layout. rope_permute: llama.cpp's "normal" rope (pairs interleaved), so q/k rows are
    permuted from transformers' rotate_half halves; the others use NEOX rope, which is transformers' layout as is.
    norm_offset: Gemma's RMSNorm scales by (1 + w), llama.cpp by w. output: "optional" (absent when tied: llama.cpp
    reads token_embd), "never" (always tied) or "always" (written even when tied). swa_pattern: llama.cpp's fixed
    sliding-window layout (every n-th layer full), checked against the checkpoint's layer_types."""

    arch: gguf.MODEL_ARCH
    rope_permute: bool = False
    norm_offset: float = 0.0
    output: str = "optional"
    rope_scaling: tuple = ("default",)  # transformers rope types whose frequencies go into a rope_freqs tensor
    swa_pattern: int = 0
    act: str = "silu"


ARCHS = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, rope_permute=True, rope_scaling=("default", "llama3", "linear")),
    "mistral": Arch(gguf.MODEL_ARCH.LLAMA, rope_permute=True),  # llama.cpp runs Mistral as its llama graph
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3),
    "gemma2": Arch(gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, output="never", swa_pattern=2, act="gelu_pytorch_tanh"),
    "gemma3_text": Arch(gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0, swa_pattern=6, act="gelu_pytorch_tanh"),
    "phi3": Arch(gguf.MODEL_ARCH.PHI3, output="always"),
}
SUPPORTED = (
    "llama (Llama 2/3/3.1/3.2 incl. llama3 rope, SmolLM2, TinyLlama), mistral, qwen2 (Qwen2/2.5), qwen3, "
    "gemma2, gemma3_text (Gemma 3 text models), phi3 (Phi-3/3.5-mini, Phi-4-mini)"
)


def head_dim(c):
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def rope_params(c):
    """The rope of the full-attention layers: transformers 5 keeps one dict, or one per layer type (Gemma 3)."""
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if "full_attention" in rope:
        rope = rope["full_attention"]
    return {"rope_type": rope.get("rope_type", rope.get("type", "default")), **rope}


def check_config(c, where):
    """UserError (one line, the covered architectures named) unless our export writes this config exactly; c: the
    config.json dict."""
    arch = ARCHS.get(c.get("model_type"))
    name = (c.get("architectures") or ["?"])[0]
    if arch is None or not name.endswith("ForCausalLM"):
        raise UserError(f"{where}: architecture {name} ({c.get('model_type')}); GGUF export supports {SUPPORTED}")
    rope = rope_params(c)
    problems = [f"{k}={c[k]!r}" for k in ("attention_bias", "mlp_bias") if c.get(k) and c["model_type"] != "qwen2"]
    if rope["rope_type"] not in arch.rope_scaling:
        problems.append(f"rope_type={rope['rope_type']!r} (covered: {', '.join(arch.rope_scaling)})")
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    if act != arch.act:
        problems.append(f"hidden_act={act!r}")
    if c.get("use_sliding_window"):
        problems.append("use_sliding_window=True")
    if arch.swa_pattern:
        want = [layer_type(i, arch.swa_pattern) for i in range(c["num_hidden_layers"])]
        if c.get("layer_types") and c["layer_types"] != want:
            problems.append(f"layer_types other than llama.cpp's 1 full in {arch.swa_pattern}")
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        if c.get("query_pre_attn_scalar", hd) != hd:  # llama.cpp scales queries by 1/sqrt(head_dim) (27B aside)
            problems.append(f"query_pre_attn_scalar={c['query_pre_attn_scalar']} (llama.cpp uses head_dim={hd})")
    if problems:
        raise UserError(f"{where}: {', '.join(problems)} is not covered; GGUF export supports {SUPPORTED}")
    return arch


def layer_type(i, pattern):
    """llama.cpp's fixed layout: layer i attends fully when i + 1 is a multiple of the pattern, else in a window."""
    return "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"


def rope_permute(w, heads):
    """HF stores each head's query/key rows as two halves (rotate_half); GGUF's llama layout interleaves the pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs(model):
    """llama.cpp's rope_freqs tensor (head_dim / 2 factors; it divides each frequency by its factor) when the
    checkpoint's rope scales frequencies (llama3, linear); None for the plain rope. The scaled frequencies are
    transformers' own (the rotary embedding's inv_freq), so they match whatever its rope function computed."""
    c = model.config
    rotary = model.model.rotary_emb
    if rope_params(c.to_dict())["rope_type"] == "default":
        return None
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise UserError(f"rope scaling with attention_scaling={rotary.attention_scaling} is not covered")
    base, dim = float(rope_params(c.to_dict())["rope_theta"]), head_dim(c)
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (plain / rotary.inv_freq.double()).float()


def transform(arch, c, hf_name, w):
    """The weight as llama.cpp's graph for this architecture expects it."""
    if arch.rope_permute and hf_name.endswith("q_proj.weight"):
        return rope_permute(w, c.num_attention_heads)
    if arch.rope_permute and hf_name.endswith("k_proj.weight"):
        return rope_permute(w, c.num_key_value_heads)
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        return w + arch.norm_offset
    return w


def tensors(arch, model):
    """(GGUF name, tensor) for every weight llama.cpp reads, transformed; UserError on a tensor gguf has no name for."""
    c = model.config
    names = gguf.TensorNameMap(arch.arch, c.num_hidden_layers)
    tied = c.tie_word_embeddings
    state = model.state_dict()
    if arch.output == "always" and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for hf_name, w in state.items():
        if hf_name == "lm_head.weight" and (arch.output == "never" or (tied and arch.output == "optional")):
            continue  # llama.cpp reads the token embedding as the output when `output` is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{hf_name}: a tensor GGUF's {arch.arch.name.lower()} layout has no name for")
        yield name, transform(arch, c, hf_name, w)
    freqs = rope_freqs(model)
    if freqs is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs


def add_hparams(writer, arch, c):
    """The keys llama.cpp's loader reads for this architecture (gguf's Keys through the writer's add_* methods)."""
    hd = head_dim(c)
    rope = rope_params(c.to_dict())
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(int(hd * rope.get("partial_rotary_factor", 1.0)))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if arch.arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(c.final_logit_softcapping or 0.0)
    if arch.swa_pattern or (arch.arch == gguf.MODEL_ARCH.PHI3 and c.sliding_window):
        writer.add_sliding_window(c.sliding_window)
    if arch.arch == gguf.MODEL_ARCH.PHI3:
        writer.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings or c.max_position_embeddings)
    window = getattr(c, "sliding_window", None)
    if arch.arch == gguf.MODEL_ARCH.LLAMA and window and window < c.max_position_embeddings:
        logger.warning("sliding_window=%d: llama.cpp's llama graph attends to the whole context", window)
