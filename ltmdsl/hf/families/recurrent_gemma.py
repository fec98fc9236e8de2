"""RecurrentGemma (model_type recurrent_gemma, Griffin): `block_types` ("recurrent", "attention") repeated over
its layers.
"""

from __future__ import annotations

import math

from ltmdsl.hf.reader import Reader, bf16, define, kind_values
from ltmdsl.hf.spec import show_value
from ltmdsl.kinds.rg_lru_hf import hidden_activation


def read(r: Reader) -> dict:
    """RecurrentGemma (Griffin): per HF layer an RG-LRU recurrent block or local attention, as `block_types`
    repeats over the layers, then a GeGLU MLP with biases. Its norms scale by (1 + w) (zero_centred), the
    embeddings by sqrt(hidden_size) rounded to bfloat16 (transformers' `normalizer` buffer), and the logits
    are soft-capped at `logits_soft_cap`."""
    vocab = r.int("vocab_size", 256000)
    d = r.int("hidden_size", 2560)
    layers = r.layers("num_hidden_layers", 26)
    eps = r.eps("rms_norm_eps", 1e-6)
    cap = r.float("logits_soft_cap", 30.0)
    r.expect("embeddings_scale_by_sqrt_dim", lambda v: v in (None, True),
             "true (transformers' RecurrentGemma always scales the embeddings)")
    for key in ("w_init_variance_scale", "final_w_init_variance_scale"):
        r.raw(key, None)  # initialisation only
    types = r.raw("block_types", ["recurrent", "recurrent", "attention"])
    if not isinstance(types, list) or not types or any(t not in ("recurrent", "attention") for t in types):
        raise r.fail(f"'block_types' must be a non-empty list of 'recurrent' / 'attention', got {show_value(types)}")
    if layers > 100 * len(types):  # RecurrentGemmaConfig repeats block_types 100 times
        raise r.fail(f"'num_hidden_layers' {layers} is more than transformers' 100 repeats of the {len(types)} "
                     "'block_types'")
    attn_at = [(types * 100)[i] == "attention" for i in range(layers)]
    for key in ("layers_block_type", "layer_types"):  # derived by RecurrentGemmaConfig; stated, they must agree
        if r.present(key):
            stated = r.raw(key)
            want = ["sliding_attention" if a else "linear_attention" for a in attn_at]
            if stated != want and stated != [("attention" if a else "recurrent") for a in attn_at]:
                raise r.fail(f"'{key}' disagrees with the layers 'block_types' and 'num_hidden_layers' give")
        r.raw(key, None)
    act = hidden_activation(r)[1]  # the MLP's GeGLU form of the activation both blocks apply
    rec = kind_values("rg_lru", r, d, present=not all(attn_at))
    attention = kind_values("attention", r, d, present=any(attn_at))
    ffn = kind_values("mlp", r, d, act=act)
    definitions, legend = {}, {}
    if not all(attn_at):
        definitions["rec"], legend["R"] = define("rg_lru", rec), "rec"
    if any(attn_at):
        definitions["local"], legend["L"] = define("attention", attention), "local"
    definitions["ffn"], legend["-"] = define("mlp", ffn), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=r.bool("tie_word_embeddings", True),
                definitions=definitions, legend=legend, tokens=tuple(("L" if a else "R") + "-" for a in attn_at),
                zero_centred=True, embed_scale=bf16(math.sqrt(d)), logit_cap=cap)
