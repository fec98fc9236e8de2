"""Jamba (model_type jamba): attention and experts placed where `i % period == offset` (0-based i)."""

from __future__ import annotations

from ltmdsl.hf.reader import Reader, define, kind_values


def read(r: Reader) -> dict:
    """Jamba: attention (no RoPE) on layers i % attn_layer_period == attn_layer_offset, Mamba-1 elsewhere;
    MoE on layers i % expert_layer_period == expert_layer_offset, a SwiGLU MLP elsewhere (0-based i)."""
    vocab = r.int("vocab_size", 65536)
    d = r.int("hidden_size", 4096)
    d_ff = r.int("intermediate_size", 14336)
    layers = r.layers("num_hidden_layers", 32)
    attention = kind_values("attention", r, d)
    eps = r.eps("rms_norm_eps", 1e-6)
    moe = kind_values("moe", r, d, d_ff=d_ff)
    a_period, a_offset = r.int("attn_layer_period", 8), r.int("attn_layer_offset", 4, minimum=0)
    e_period, e_offset = r.int("expert_layer_period", 2), r.int("expert_layer_offset", 1, minimum=0)
    if a_offset >= a_period or e_offset >= e_period:
        raise r.fail(f"'attn_layer_offset' ({a_offset}) must be smaller than 'attn_layer_period' ({a_period}) and "
                     f"'expert_layer_offset' ({e_offset}) smaller than 'expert_layer_period' ({e_period})")
    r.act()
    mamba = kind_values("mamba", r, d)
    definitions = {}
    legend = {}
    attn_at = [i % a_period == a_offset for i in range(layers)]
    moe_at = [moe["experts"] > 1 and i % e_period == e_offset for i in range(layers)]
    if not all(attn_at):
        definitions["ssm"], legend["M"] = define("mamba", mamba), "ssm"
    if any(attn_at):
        definitions["attn"], legend["A"] = define("attention", attention), "attn"
    if not all(moe_at):
        definitions["ffn"], legend["-"] = define("mlp", kind_values("mlp", r, d, d_ff=d_ff)), "ffn"
    if any(moe_at):
        definitions["moe"], legend["E"] = define("moe", moe), "moe"
    tokens = tuple(("A" if a else "M") + ("E" if e else "-") for a, e in zip(attn_at, moe_at))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend, tokens=tokens,
                hf=dict(attn_layer_period=a_period, attn_layer_offset=a_offset,
                        expert_layer_period=e_period, expert_layer_offset=e_offset))
