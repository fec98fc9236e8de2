"""Qwen3-Next (model_type qwen3_next): each layer's mixer named in `layer_types`, or attention on every
`full_attention_interval`-th layer (1-based).
"""

from __future__ import annotations

from ltmdsl.hf.reader import Reader, define, kind_values
from ltmdsl.hf.spec import show_value


#: Qwen3-Next's layer types -> (kind, definition name, legend symbol) of the mixer.
_QWEN3_NEXT_MIXERS = {"linear_attention": ("gated_deltanet", "gdn", "L"), "full_attention": ("attention", "attn", "A")}


def read(r: Reader) -> dict:
    """Qwen3-Next: per HF layer a Gated DeltaNet (`linear_attention`) or gated attention (`full_attention`),
    from `layer_types` or, when it is absent, attention on layers (i + 1) % full_attention_interval == 0;
    then the sparse MoE block (routed experts and a gated shared expert) where num_experts > 0, i is not in
    `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0, a dense SwiGLU MLP elsewhere (0-based i). Every
    RMSNorm but the Gated DeltaNet's gated norm is zero-centred (it scales by 1 + w)."""
    vocab = r.int("vocab_size", 151936)
    d = r.int("hidden_size", 2048)
    layers = r.layers("num_hidden_layers", 48)
    eps = r.eps("rms_norm_eps", 1e-6)
    r.act()
    types = r.raw("layer_types", None)
    if types is None:
        interval = r.int("full_attention_interval", 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    else:
        r.raw("full_attention_interval", None)  # Qwen3NextConfig reads it only without layer_types
        if not isinstance(types, list) or len(types) != layers or \
                any(not isinstance(t, str) or t not in _QWEN3_NEXT_MIXERS for t in types):
            raise r.fail(f"'layer_types' must list num_hidden_layers = {layers} of 'linear_attention' / "
                         f"'full_attention', got {show_value(types)}")
    r.expect("use_sliding_window", lambda v: v in (None, False), "false (Qwen3-Next attention has no window)")
    r.expect("sliding_window", lambda v: v is None, "null (Qwen3-Next attention has no window)")
    experts = r.int("num_experts", 512, minimum=0)
    step = r.int("decoder_sparse_step", 1)
    only = r.raw("mlp_only_layers", None) or []
    if not isinstance(only, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers
                                         for i in only):
        raise r.fail(f"'mlp_only_layers' must list 0-based layer indices below num_hidden_layers = {layers}, "
                     f"got {show_value(only)}")
    moe_at = [experts > 0 and i not in only and (i + 1) % step == 0 for i in range(layers)]
    values = {t: kind_values(kind, r, d, present=t in types) for t, (kind, _, _) in _QWEN3_NEXT_MIXERS.items()}
    moe = kind_values("moe", r, d, present=any(moe_at))
    mlp = kind_values("mlp", r, d, present=not all(moe_at))
    definitions, legend = {}, {}
    for t, (kind, name, symbol) in _QWEN3_NEXT_MIXERS.items():
        if t in types:
            definitions[name], legend[symbol] = define(kind, values[t]), name
    if any(moe_at):
        definitions["moe"], legend["E"] = define("moe", moe), "moe"
    if not all(moe_at):
        definitions["ffn"], legend["-"] = define("mlp", mlp), "ffn"
    tokens = tuple(_QWEN3_NEXT_MIXERS[t][2] + ("E" if e else "-") for t, e in zip(types, moe_at))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend, tokens=tokens, zero_centred=True,
                hf=dict(layer_types=list(types), mlp_only_layers=sorted(set(only)), decoder_sparse_step=step))
