"""Kimi-Linear (model_type kimi_linear, transformers' KimiLinearForCausalLM): config reader, export writer, layout.

Per HF decoder layer a Kimi Delta Attention (`linear_attention`: the kda kind, ltmdsl/kinds/kda_hf.py) or
multi-head latent attention without RoPE (`full_attention`: the mla kind, ltmdsl/kinds/mla_hf.py), then a
SwiGLU MLP of `intermediate_size` (`dense`) or the MoE of routed experts and shared experts with DeepSeek-V3's
sigmoid router (`sparse`, ltmdsl/kinds/moe_hf.py), each with a plain RMSNorm before it. KimiLinearConfig places
them as its `__post_init__` does:
  - mixers: `layer_types`; else `linear_attn_config.full_attn_layers` and `kda_layers` (1-based layer numbers,
    which together must name every layer once); else full attention on 0-based layers i > 0 with i % 4 == 0;
  - feed-forwards: `mlp_layer_types`; else dense on the first `first_k_dense_replace` (default 1) layers.
Stated both ways, the two forms must agree. transformers' KimiLinearForCausalLM never ties its head to the
embeddings (it declares no tied weights), so `tie_word_embeddings: true` is refused; `model_max_length` (its
saved name of max_position_embeddings) does not change the computation of a model without RoPE; a
multi-token-prediction module (`num_nextn_predict_layers`) or experts every `moe_layer_freq` layers, which the
original code has and transformers does not build, are refused unless absent, 0 and 1. Tensor names are
Llama's (`input_layernorm`, `post_attention_layernorm`) around `self_attn` and `mlp` / `block_sparse_moe`.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import show_value
from ltmdsl.kinds.hf import hf_facet
from ltmdsl.kinds.kda_hf import linear_attn_config

FAMILY = "kimi_linear"
ARCH = "KimiLinearForCausalLM"
#: KimiLinearConfig's default pad_token_id (the padding row only affects training: harmless to the logits).
PAD_TOKEN = 163839
#: layer type -> (kind, definition name, legend symbol); mixers first, then feed-forwards.
MIXERS = {"linear_attention": ("kda", "kda", "K"), "full_attention": ("mla", "attn", "A")}
FFNS = {"dense": ("mlp", "dense", "-"), "sparse": ("moe", "moe", "E")}


def _types(r: Reader, key: str, allowed, layers: int) -> list[str] | None:
    """A stated per-layer list of `allowed` types, checked; None when absent."""
    types = r.raw(key, None)
    if types is not None and (not isinstance(types, list) or len(types) != layers
                              or any(not isinstance(t, str) or t not in allowed for t in types)):
        raise r.fail(f"'{key}' must list num_hidden_layers = {layers} of {' / '.join(map(repr, allowed))}, "
                     f"got {show_value(types)}")
    return types


def _mixer_types(r: Reader, layers: int) -> list[str]:
    """Each layer's mixer type (module docstring)."""
    stated = _types(r, "layer_types", MIXERS, layers)
    sub = linear_attn_config(r)
    placed = None
    if "full_attn_layers" in sub and "kda_layers" in sub:
        full, kda = sub["full_attn_layers"], sub["kda_layers"]
        numbers = [n for group in (full, kda) if isinstance(group, list) for n in group]
        if not isinstance(full, list) or not isinstance(kda, list) or any(
                not isinstance(n, int) or isinstance(n, bool) for n in numbers) or \
                sorted(numbers) != list(range(1, layers + 1)):
            raise r.fail(f"'linear_attn_config.full_attn_layers' and 'kda_layers' must together list each layer "
                         f"number 1 to {layers} once, got {show_value(full)} and {show_value(kda)}")
        placed = ["full_attention" if i + 1 in full else "linear_attention" for i in range(layers)]
    if stated is not None and placed is not None and stated != placed:
        raise r.fail("'layer_types' disagrees with 'linear_attn_config.full_attn_layers' / 'kda_layers'")
    return stated or placed or ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(layers)]


def _ffn_types(r: Reader, layers: int) -> list[str]:
    """Each layer's feed-forward type (module docstring)."""
    stated = _types(r, "mlp_layer_types", FFNS, layers)
    if r.present("first_k_dense_replace") or stated is None:
        first = r.int("first_k_dense_replace", 1, minimum=0)
        derived = ["dense" if i < first else "sparse" for i in range(layers)]
        if stated is not None and stated != derived:
            raise r.fail(f"'mlp_layer_types' disagrees with 'first_k_dense_replace' ({first})")
        return derived
    r.raw("first_k_dense_replace", None)  # null: mlp_layer_types decides
    return stated


def _values(kind: str, r: Reader, d: int, present: bool) -> dict:
    return hf_facet(kind).read(r, ReadContext(FAMILY, d, present))


def read(r: Reader) -> dict:
    """Kimi-Linear's plan fields with KimiLinearConfig's defaults (module docstring)."""
    vocab, d = r.int("vocab_size", 163840), r.int("hidden_size", 2304)
    layers = r.layers("num_hidden_layers", 27)
    eps = r.eps("rms_norm_eps", 1e-5)
    r.act()
    r.expect("tie_word_embeddings", lambda v: v in (None, False),
             "false (transformers' KimiLinearForCausalLM never ties its head to the embeddings)")
    r.int("model_max_length", 1048576)  # max_position_embeddings' saved name: no RoPE, no effect
    r.expect("num_nextn_predict_layers", lambda v: v in (None, 0), "0 (transformers builds no MTP module)")
    r.expect("moe_layer_freq", lambda v: v in (None, 1), "1 (transformers' Kimi-Linear places experts by "
             "mlp_layer_types / first_k_dense_replace only)")
    mixers, ffns = _mixer_types(r, layers), _ffn_types(r, layers)
    values = {t: _values(kind, r, d, t in mixers) for t, (kind, _, _) in MIXERS.items()}
    values.update({t: _values(kind, r, d, t in ffns) for t, (kind, _, _) in FFNS.items()})
    definitions, legend = {}, {}
    for t, (kind, name, symbol) in {**MIXERS, **FFNS}.items():
        if t in mixers or t in ffns:
            definitions[name], legend[symbol] = (kind, hf_facet(kind).call(values[t])), name
    tokens = tuple(MIXERS[m][2] + FFNS[f][2] for m, f in zip(mixers, ffns))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=False, definitions=definitions, legend=legend,
                tokens=tokens, hf=dict(layer_types=mixers, mlp_layer_types=ffns))


def config(ir, base: dict, eps: float) -> dict:
    """Kimi-Linear's config.json: layer_types and mlp_layer_types, each kind's one setting."""
    from ltmdsl.hf.export import _one  # the writers' check that the layers hold one setting (export imports us)

    if ir.tie_embeddings:
        raise HFError("transformers' Kimi-Linear never ties its head to the embeddings (head = tied has no "
                      "counterpart)")
    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffns = [layer.mixer for layer in ir.layers[1::2]]
    out = {**base, "model_type": FAMILY, "num_hidden_layers": len(mixers), "rms_norm_eps": eps, "hidden_act": "silu",
           # the default padding id 163839 must be a token: transformers refuses a smaller vocabulary with it
           **({"pad_token_id": None} if ir.vocab <= PAD_TOKEN else {}),
           "layer_types": [t for m in mixers for t, (kind, _, _) in MIXERS.items() if kind == m.kind],
           "mlp_layer_types": [t for f in ffns for t, (kind, _, _) in FFNS.items() if kind == f.kind]}
    for kind in dict.fromkeys(c.kind for c in mixers + ffns):
        group = [c for c in mixers + ffns if c.kind == kind]
        out.update(hf_facet(kind).write(_one(group, f"{hf_facet(kind).label} settings"), FAMILY, ir.d_model))
    return out
