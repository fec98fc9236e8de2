"""Gemma 3 text models (model_type gemma3_text, and the text part of the multimodal `gemma3` configs), as
transformers' Gemma3ForCausalLM.

Every HF layer is attention then a GeGLU MLP (`hidden_activation`: gelu_pytorch_tanh is geglu_tanh, gelu is
geglu), each with sandwich norms: a pre-norm (`input_layernorm`, `pre_feedforward_layernorm`) and a norm of its
output before the residual add (`post_attention_layernorm`, `post_feedforward_layernorm`: `post_norm`). Every
RMSNorm is zero-centred (it scales by 1 + w), the q/k head norms too (stored as w, loaded as 1 + w: op
"plus_one"). The embeddings are scaled by sqrt(hidden_size) (an fp32 buffer cast to the weights' dtype, which
is what `embed_scale` does), the softmax scale is query_pre_attn_scalar^-1/2, the logits are soft-capped at
`final_logit_softcapping` when it is set. `attn_logit_softcapping` is refused unless null: Gemma3Attention
stores it but never applies it.
The layers `layer_types` calls "sliding_attention" (without it: all but every `sliding_window_pattern`-th,
1-based, default 6) attend to `sliding_window` tokens with their own RoPE; the others are global. Their RoPE
differs per layer type: transformers 5's `rope_parameters` holds one dict per type; older configs state
`rope_theta` (global, default 1e6), `rope_local_base_freq` (local, default 10000) and a `rope_scaling` that
applies to the global layers only (Gemma-3-27B: linear, factor 8). Each type's dict may be plain, linear,
llama3 or yarn, as transformers' rope functions compute them.
A `gemma3` config reads its `text_config` this way; the vision tower and projector (`vision_config`,
`mm_tokens_per_image` and the image token ids) are left out with a NOTE: the model is the text decoder.
"""

from __future__ import annotations

import math

from ltmdsl.hf import HFError
from ltmdsl.hf.families.multimodal import text_decoder
from ltmdsl.hf.reader import MAX_FLOAT, SCALINGS, Reader, dims, llama3
from ltmdsl.hf.spec import num, safe_text, show_value
from ltmdsl.kinds.attention_hf import scaling_fields
from ltmdsl.kinds.hf import hf_facet
from ltmdsl.kinds.rg_lru_hf import hidden_activation

MODEL_TYPE = "gemma3_text"
ARCH = "Gemma3ForCausalLM"
_TYPES = ("sliding_attention", "full_attention")
#: the multimodal config's keys that belong to the vision part (left out with a NOTE) or are token ids
_VISION_KEYS = ("vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index", "image_token_index",
                "boi_token_id", "eoi_token_id", "image_token_id")


def misfit(c) -> str | None:
    """Why a Gemma-3 layer cannot be this attention or MLP (None: it can)."""
    if c.kind == "attention":
        others = [n for n, on in (("sinks", c.sinks), ("gate", c.gate), ("qk_l2_norm", c.qk_l2_norm),
                                  ("softcap (transformers' Gemma-3 never applies attn_logit_softcapping)",
                                   c.softcap is not None),
                                  ("chunk", c.chunk is not None), ("scale", c.scale is not None),
                                  ("temperature_floor", c.temperature_floor is not None),
                                  ("rope_dim", c.rope_dim is not None), ("v_head_dim", c.v_head_dim != c.head_dim),
                                  ("causal = false", not c.causal)) if on]
        if not c.qk_norm or c.rope_theta is None or others or c.qkv_bias != c.out_bias:
            return ("Gemma-3 attention has qk_norm, RoPE over the whole head and one attention_bias on q, k, v and o"
                    + (f"; not {', '.join(others)}" if others else ""))
        if c.rope_scaling is not None and c.rope_scaling.kind not in ("linear", "llama3", "yarn"):
            return f"Gemma-3's RoPE scalings are linear, llama3 or yarn, not {c.rope_scaling.kind}"
        return None
    if c.kind == "mlp":
        return None if c.activation in ("geglu_tanh", "geglu") and not c.bias else \
            "Gemma-3's MLPs are GeGLU (geglu_tanh or geglu) without biases"
    return f"Gemma-3 has no {c.kind} layers"


LAYOUT = dict(description="Gemma-3 (attention with qk_norm, global or sliding, each followed by a GeGLU MLP; "
                          "sandwich norms, zero-centred)",
              family="recurrent_gemma", paired=True, mixers=("attention",), ffns=("mlp",),
              not_mixer="Gemma-3 has attention mixers only", not_ffn="expected the MLP that follows each mixer",
              own=misfit)


def _number(r: Reader, where: str, value, minimum: float = 0.0) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value <= minimum or value > MAX_FLOAT:
        raise r.fail(f"'{where}' must be a positive number up to {MAX_FLOAT:g}, got {show_value(value)}")
    return float(value)


def _rope(r: Reader, where: str, rp: dict):
    """(rope_theta, scaling) of one layer type's dict `rp` (its theta already filled in)."""
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise r.fail(f"'{where}.rope_type' = {show_value(rope_type)} is not supported (supported: 'default', "
                     "'linear', 'llama3', 'yarn')")
    if rp.get("partial_rotary_factor", 1.0) not in (1, 1.0):
        raise r.fail(f"'{where}.partial_rotary_factor' must be 1.0 (transformers' Gemma-3 rotates the whole head), "
                     f"got {show_value(rp['partial_rotary_factor'])}")
    theta = _number(r, f"{where}.rope_theta", rp.get("rope_theta"))
    if rope_type == "default":
        unknown = sorted(str(k) for k in rp if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor"))
        if unknown:
            raise r.fail(f"'{where}' of rope_type 'default' has keys transformers does not read there: "
                         f"{', '.join(safe_text(k) for k in unknown)}")
        return theta, None
    read = llama3 if rope_type == "llama3" else SCALINGS[rope_type]
    return theta, read(r, where, rp)


def _layer_ropes(r: Reader) -> dict:
    """Each layer type's (rope_theta, scaling), as Gemma3TextConfig.convert_rope_params_to_dict fills them."""
    global_theta = r.raw("rope_theta", None)
    local_theta = r.raw("rope_local_base_freq", None)
    params, scaling = r.raw("rope_parameters", None), r.raw("rope_scaling", None)
    r.expect("partial_rotary_factor", lambda v: v in (None, 1, 1.0), "1.0 (transformers' Gemma-3 rotates the whole "
             "head)")
    if params is not None and (not isinstance(params, dict) or any(k not in _TYPES for k in params)
                               or any(v is not None and not isinstance(v, dict) for v in params.values())):
        raise r.fail(f"'rope_parameters' must map 'sliding_attention' and 'full_attention' to RoPE dicts "
                     f"(Gemma-3's RoPE differs per layer type), got {show_value(params)}")
    if scaling is not None and not isinstance(scaling, dict):
        raise r.fail(f"'rope_scaling' must be a RoPE dict, got {show_value(scaling)}")
    params = params or {}
    out = {}
    for t, theta, default, legacy in (("full_attention", global_theta, 1e6, scaling),
                                      ("sliding_attention", local_theta, 1e4, None)):
        rp = dict(params.get(t) or {"rope_type": "default"})
        rp.update(legacy or {})
        rp.setdefault("rope_theta", default if theta is None else theta)
        where = f"rope_parameters.{t}" if t in params and not legacy else ("rope_scaling" if legacy else
                                                                             "rope_theta" if t == "full_attention"
                                                                             else "rope_local_base_freq")
        out[t] = _rope(r, where, rp)
    return out


def layer_types(r: Reader, layers: int) -> list[str]:
    """`layer_types`, or sliding_window_pattern's: sliding unless (i + 1) % pattern == 0 (0-based i)."""
    types = r.raw("layer_types", None)
    pattern = r.int("sliding_window_pattern", 6)
    r.raw("_sliding_window_pattern", None)  # what transformers 5 saves of it; it never reads this key back
    if types is None:
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in _TYPES for t in types):
        raise r.fail(f"'layer_types' must list num_hidden_layers = {layers} of 'sliding_attention' / "
                     f"'full_attention', got {show_value(types)}")
    return types


def _soft_cap(r: Reader, key: str) -> float | None:
    return None if r.raw(key, None) is None else r.float(key)


def read_text(r: Reader) -> dict:
    """The plan fields of a Gemma3TextConfig's keys."""
    vocab = r.int("vocab_size", 262208)
    d = r.int("hidden_size", 2304)
    d_ff = r.int("intermediate_size", 9216)
    layers = r.layers("num_hidden_layers", 26)
    eps = r.eps("rms_norm_eps", 1e-6)
    tied = r.bool("tie_word_embeddings", True)
    heads = r.int("num_attention_heads", 8)
    kv, head_dim = dims(r, d, heads, 256, 4)
    bias = r.bool("attention_bias", False)
    scalar = r.int("query_pre_attn_scalar", 256)  # Gemma3TextConfig types it int
    # Gemma3Attention keeps attn_logit_softcapping but never applies it: a cap would be intent that transformers'
    # computation (which the checkpoint was validated against) ignores, so only null is honest
    r.expect("attn_logit_softcapping", lambda v: v is None, "null (transformers' Gemma-3 never applies it)")
    cap = _soft_cap(r, "final_logit_softcapping")
    r.expect("use_bidirectional_attention", lambda v: v in (None, False), "false (causal attention)")
    act = hidden_activation(r)[1]
    types = layer_types(r, layers)
    window = r.int("sliding_window", 4096) if r.present("sliding_window") or "sliding_window" not in r.cfg else None
    r.raw("sliding_window", None)
    if window is None and "sliding_attention" in types:
        raise r.fail("'sliding_window' is null but the layers have sliding_attention layers")
    ropes = _layer_ropes(r)
    post = f"post_norm = rmsnorm(eps = {num(eps)}, zero_centred = true)"
    attention = dict(heads=heads, kv_heads=kv, head_dim=head_dim, qkv_bias=bias, out_bias=bias, qk_norm=True,
                     query_pre_attn_scalar=scalar)
    definitions, legend = {}, {}
    for t, name, symbol in (("sliding_attention", "local", "L"), ("full_attention", "global", "G")):
        if t in types:
            theta, scaling = ropes[t]
            values = {**attention, "rope_theta": theta, "rope_scaling": scaling,
                      "window": window if t == "sliding_attention" else None}
            definitions[name], legend[symbol] = ("attention", _with(hf_facet("attention").call(values), post)), name
    mlp = hf_facet("mlp").call(dict(d_ff=d_ff, act=act))
    definitions["ffn"], legend["-"] = ("mlp", _with(mlp, post)), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple(("L" if t == "sliding_attention" else "G") + "-" for t in types), zero_centred=True,
                embed_scale=math.sqrt(d), logit_cap=cap)


def _with(call: str, argument: str) -> str:
    """A layer call with one more (validated) argument: `attention(a = 1)` -> `attention(a = 1, post_norm = ...)`."""
    return f"{call[:-1]}, {argument})"


def read(r: Reader) -> dict:
    """gemma3_text: the config's own keys."""
    return read_text(r)


def read_multimodal(r: Reader) -> dict:
    """gemma3: the text decoder of `text_config` (read as gemma3_text); the vision part left out with a NOTE."""
    return text_decoder(r, read_text, MODEL_TYPE, _VISION_KEYS)


def _whole(value: float, what: str) -> int:
    if not float(value).is_integer():
        raise HFError(f"Gemma-3's {what} is an integer, not {value!r}")
    return int(value)


def fits(ir) -> bool:
    """Whether export picks Gemma-3: attention + MLP pairs, every sub-layer with a post_norm (sandwich norms)."""
    layers = ir.layers
    return len(layers) % 2 == 0 and all(x.kind == "attention" for x in layers[0::2]) and \
        all(x.kind == "mlp" for x in layers[1::2]) and all(x.post_norm is not None for x in layers)


def config(ir, base: dict, eps: float) -> dict:
    """The config.json fields of a model `fits` accepted (HFError for what Gemma-3 cannot hold)."""
    from ltmdsl.hf.export import _one

    norms = {x.norm for x in ir.layers} | {x.post_norm for x in ir.layers} | {ir.final_norm}
    if len(norms) != 1 or not ir.final_norm.zero_centred:
        raise HFError("Gemma-3's norms (pre, post and final) are one zero-centred rmsnorm")
    if ir.embed_scale != math.sqrt(ir.d_model) or ir.residual_scale != 1 or ir.logit_scale != 1:
        raise HFError(f"Gemma-3 scales its embeddings by sqrt(hidden_size) = {math.sqrt(ir.d_model)!r} and has no "
                      "residual or logit scale")
    why = next((w for x in ir.layers for w in [misfit(x.mixer)] if w), None)
    if why:
        raise HFError(why)
    attns = [x.mixer for x in ir.layers[0::2]]
    shared = _one([(a.heads, a.kv_heads, a.head_dim, a.qkv_bias, a.query_pre_attn_scalar) for a in attns],
                  "attention settings other than the window and RoPE (Gemma-3 has one)")
    heads, kv, head_dim, bias, scalar = shared
    local = [a for a in attns if a.window is not None]
    ropes = {}
    for t, group in (("sliding_attention", local), ("full_attention", [a for a in attns if a.window is None])):
        if group:
            theta, scaling = _one([(a.rope_theta, a.rope_scaling) for a in group], f"RoPE of the {t} layers")
            ropes[t] = {"rope_type": "default", "rope_theta": theta}
            if scaling is not None:
                ropes[t] = {**scaling_fields(scaling)["rope_scaling"], "rope_theta": theta}
    windows = sorted({a.window for a in local})
    if len(windows) > 1:
        raise HFError(f"Gemma-3's sliding layers share one sliding_window, not {windows}")
    mlp = _one([x.mixer for x in ir.layers[1::2]], "MLP settings (Gemma-3 has one intermediate_size)")
    return {**base, "model_type": MODEL_TYPE, "num_hidden_layers": len(attns), "rms_norm_eps": eps,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "attention_bias": bias,
            "query_pre_attn_scalar": head_dim if scalar is None else _whole(scalar, "query_pre_attn_scalar"),
            "attn_logit_softcapping": None,
            "final_logit_softcapping": ir.logit_cap, "sliding_window": windows[0] if windows else 4096,
            "layer_types": ["sliding_attention" if a.window is not None else "full_attention" for a in attns],
            "rope_parameters": {t: ropes.get(t, {"rope_type": "default", "rope_theta": 1e4 if t[0] == "s" else 1e6})
                                for t in _TYPES},
            "intermediate_size": mlp.d_ff,
            "hidden_activation": "gelu_pytorch_tanh" if mlp.activation == "geglu_tanh" else "gelu"}
