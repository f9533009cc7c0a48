"""A real Llama checkpoint whose greedy (and, in practice, sampled) answer to any prompt is a fixed script.

Each piece of the script is added to the tokenizer as one token. The layers are silenced (o_proj and down_proj
zeroed), so the last hidden state is the current token's embedding: every ordinary token's embedding points
at piece 1, piece k's at piece k+1, and the last piece's at end-of-text. The serving code then runs its
normal path (tokenize, generate, decode) and tests can assert on exact text.
"""

from pathlib import Path

# After "4. Instruction:" this parses as two new Self-Instruct tasks (the format generate_instruction.py reads).
SCRIPT = (
    "Suggest a name for a bakery that sells only rye bread.\n4. Input:\n<noinput>\n4. Output:\nRye and Shine\n\n",
    "###\n5. Instruction: Convert the temperature from Celsius to Fahrenheit.\n5. Input:\n25 degrees Celsius\n",
    "5. Output:\n77 degrees Fahrenheit",
)
LOGIT_GAP = 40.0  # logit of the scripted token minus every other: at temperature 2 the rest share e^-20 of the mass


def build_scripted_llama(tokenizer_dir, out_dir, pieces=SCRIPT, context_window=8192):
    import torch
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    piece_ids = tok.convert_tokens_to_ids(list(pieces))
    hidden = 32
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_window,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    basis = torch.eye(hidden)
    targets = [*piece_ids, tok.eos_token_id]  # state k predicts targets[k]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(basis[0].expand(len(tok), hidden))
        for k, tid in enumerate(piece_ids, 1):
            model.model.embed_tokens.weight[tid] = basis[k]
        model.lm_head.weight.zero_()
        scale = LOGIT_GAP / hidden**0.5  # the final RMSNorm scales a one-hot state up by sqrt(hidden)
        for k, tid in enumerate(targets):
            model.lm_head.weight[tid] = basis[k] * scale
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)
