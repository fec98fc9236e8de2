"""LFM2 (model_type lfm2): each layer's type in `layer_types` ("conv" or "full_attention"), or its attention
layers in `full_attn_idxs`.
"""

from __future__ import annotations

from ltmdsl.hf.reader import Reader, define, kind_values
from ltmdsl.hf.spec import show_value


def _lfm2_types(r: Reader, layers: int) -> list[bool]:
    """LFM2: whether each layer is attention, from `layer_types` (which wins, as in Lfm2Config) or
    `full_attn_idxs` (0-based; every layer when neither is set)."""
    types, idxs = r.raw("layer_types", None), r.raw("full_attn_idxs", None)
    if idxs is not None and (not isinstance(idxs, list) or any(
            not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers for i in idxs)):
        raise r.fail(f"'full_attn_idxs' must list 0-based layer indices below num_hidden_layers = {layers}, "
                     f"got {show_value(idxs)}")
    if types is None:
        return [idxs is None or i in idxs for i in range(layers)]
    if not isinstance(types, list) or any(t not in ("conv", "full_attention") for t in types):
        raise r.fail(f"'layer_types' must be a list of 'conv' / 'full_attention', got {show_value(types)}")
    if len(types) != layers:
        raise r.fail(f"'layer_types' lists {len(types)} layers but 'num_hidden_layers' is {layers}")
    attn = [t == "full_attention" for t in types]
    if idxs is not None and sorted(set(idxs)) != [i for i, a in enumerate(attn) if a]:
        raise r.fail(f"'full_attn_idxs' {show_value(idxs)} disagrees with the attention layers of 'layer_types'")
    return attn


def read(r: Reader) -> dict:
    """LFM2 (Liquid AI): per HF layer a gated short convolution ("conv") or GQA attention with per-head q/k
    RMSNorm ("full_attention"), then a SwiGLU MLP; the final norm is called embedding_norm. The original
    configs' aliases (block_dim, block_norm_eps, tie_embedding) are read and checked as Lfm2Config reads them."""
    vocab = r.int("vocab_size", 65536)
    d = r.int("hidden_size", 2560)
    r.expect("block_dim", lambda v: v in (None, d), f"null or hidden_size ({d}); transformers' LFM2 uses hidden_size")
    layers = r.layers("num_hidden_layers", 32)
    eps = r.eps("norm_eps", 1e-5)
    r.raw("block_norm_eps", None)  # the original configs' copy of norm_eps; transformers reads only norm_eps
    tied = r.bool("tie_word_embeddings", True)
    if r.present("tie_embedding"):  # Lfm2Config pops it into tie_word_embeddings
        tied = r.bool("tie_embedding", True)
    r.raw("tie_embedding", None)
    attn_at = _lfm2_types(r, layers)
    attention = kind_values("attention", r, d, present=any(attn_at))
    conv = kind_values("short_conv", r, d, present=not all(attn_at))
    ffn = kind_values("mlp", r, d)
    definitions, legend = {}, {}
    if not all(attn_at):
        definitions["conv"], legend["C"] = define("short_conv", conv), "conv"
    if any(attn_at):
        definitions["attn"], legend["A"] = define("attention", attention), "attn"
    definitions["ffn"], legend["-"] = define("mlp", ffn), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple(("A" if a else "C") + "-" for a in attn_at))
