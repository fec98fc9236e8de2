"""Bamba (model_type bamba): Mamba-2, with attention at the 0-based `attn_layer_indices`."""

from __future__ import annotations

from ltmdsl.hf.reader import Reader, define, kind_values
from ltmdsl.hf.spec import show_value


def read(r: Reader) -> dict:
    """Bamba (IBM): per HF layer a Mamba-2 mixer, or attention where the 0-based index is in
    `attn_layer_indices`, then a SwiGLU MLP. Its attention applies RoPE to the first head_dim *
    partial_rotary_factor channels of each head (0.5: BambaConfig forces it unless rope_parameters says
    otherwise); the Mamba-2 gated RMSNorm is grouped by mamba_n_groups and uses rms_norm_eps."""
    vocab = r.int("vocab_size", 128000)
    d = r.int("hidden_size", 4096)
    ffn = kind_values("mlp", r, d)
    layers = r.layers("num_hidden_layers", 32)
    eps = r.eps("rms_norm_eps", 1e-5)
    r.act()
    for key in ("layers_block_type", "layer_types"):
        if key in r.cfg:
            r.used.add(key)
            raise r.fail(f"'{key}' cannot be set in a Bamba config (BambaConfig derives it from attn_layer_indices "
                         "and transformers refuses to load a config that sets it); give attn_layer_indices instead")
    indices = r.raw("attn_layer_indices", [])
    if not isinstance(indices, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers
                                            for i in indices):
        raise r.fail(f"'attn_layer_indices' must list 0-based layer indices below num_hidden_layers = {layers}, "
                     f"got {show_value(indices)}")
    attn_at = set(indices)
    attention = kind_values("attention", r, d, present=bool(attn_at))
    mamba = kind_values("mamba2", r, d, present=len(attn_at) < layers)
    definitions, legend = {}, {}
    if len(attn_at) < layers:
        definitions["ssm"], legend["M"] = define("mamba2", mamba), "ssm"
    if attn_at:
        definitions["attn"], legend["A"] = define("attention", attention), "attn"
    definitions["ffn"], legend["-"] = define("mlp", ffn), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", False),
                definitions=definitions, legend=legend,
                tokens=tuple(("A" if i in attn_at else "M") + "-" for i in range(layers)),
                hf=dict(attn_layer_indices=sorted(attn_at)))
