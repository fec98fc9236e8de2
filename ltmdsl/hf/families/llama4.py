"""Llama 4 text models (model_type llama4_text; the language model of Llama-4 Scout and Maverick), as
transformers' Llama4ForCausalLM.

Every HF layer is attention then a feed-forward block:
- attention with RoPE on the layers `no_rope_layers` marks 1 (by default all but every
  `no_rope_layer_interval`-th, 1-based), and none (NoPE) on the others. `layer_types` (by default chunked on the
  RoPE layers when `attention_chunk_size` is set) makes a layer see only its own chunk of attention_chunk_size
  tokens (`chunk`). With `use_qk_norm` the RoPE layers divide q and k by their root mean square (the weightless
  Llama4TextL2Norm, eps rms_norm_eps: `qk_l2_norm`). Llama-4 rotates interleaved channel pairs (2i, 2i + 1)
  as complex numbers where the runtime rotates halves (i, i + head_dim / 2): q_proj and k_proj rows are
  reordered per head on import (op "rope_pairs") and back on export, which leaves every q.k unchanged.
  `attn_temperature_tuning` (on by default) scales the NoPE layers' queries by 1 + attn_scale * ln(1 +
  floor((p + 1) / floor_scale)) at position p: `temperature_floor` and `temperature_scale` there.
- on the layers `moe_layers` lists (by default every `interleave_moe_layer_step`-th, 1-based) the MoE: a router
  whose top `num_experts_per_tok` logits pass a sigmoid (`sigmoid_topk`), each chosen expert's input scaled by
  its score (`weight_input`), SwiGLU experts of `intermediate_size` stored fused and transposed
  (`experts.gate_up_proj [E, d, 2F]`, gate columns then up; `experts.down_proj [E, F, d]`) and a shared expert of
  the same width (`shared_expert`); elsewhere a dense SwiGLU MLP of `intermediate_size_mlp`.
A `llama4` (multimodal) config reads its `text_config` this way; the vision part is left out with a NOTE.
"""

from __future__ import annotations

from dataclasses import replace

from ltmdsl.hf import HFError
from ltmdsl.hf.families.multimodal import text_decoder
from ltmdsl.hf.families.qwen3_moe import read_layer_indices
from ltmdsl.hf.reader import Reader, dims, rope
from ltmdsl.hf.spec import show_value
from ltmdsl.kinds.attention_hf import scaling_fields
from ltmdsl.kinds.hf import hf_facet

MODEL_TYPE = "llama4_text"
ARCH = "Llama4ForCausalLM"
_TYPES = ("full_attention", "chunked_attention")


def misfit(c) -> str | None:
    """Why a Llama-4 layer cannot be this attention, MoE or MLP (None: it can)."""
    if c.kind == "attention":
        others = [n for n, on in (("qk_norm", c.qk_norm), ("gate", c.gate), ("sinks", c.sinks),
                                  ("softcap", c.softcap is not None), ("window", c.window is not None),
                                  ("query_pre_attn_scalar", c.query_pre_attn_scalar is not None),
                                  ("scale", c.scale is not None), ("rope_dim", c.rope_dim is not None),
                                  ("v_head_dim", c.v_head_dim != c.head_dim), ("causal = false", not c.causal)) if on]
        if others or c.qkv_bias != c.out_bias:
            return ("Llama-4 attention has one attention_bias on q, k, v and o" + (f"; not {', '.join(others)}"
                                                                                    if others else ""))
        if c.rope_theta is None and c.qk_l2_norm:
            return "Llama-4's NoPE layers have no qk_l2_norm (use_qk_norm applies to the RoPE layers)"
        if c.rope_theta is not None and c.temperature_floor is not None:
            return "Llama-4's temperature tuning applies to its NoPE layers only"
        if c.rope_scaling is not None and c.rope_scaling.kind not in ("llama3", "linear", "yarn"):
            return f"Llama-4's RoPE scalings are llama3, linear or yarn, not {c.rope_scaling.kind}"
        return None
    if c.kind == "moe":
        variants = set(c.variants())
        if c.activation != "swiglu" or c.routing != "sigmoid_topk" or variants != {"shared_d_ff", "weight_input"} \
                or c.shared_d_ff != c.d_ff:
            return ("Llama-4's MoE is sigmoid_topk routing with weight_input and a SwiGLU shared expert as wide as "
                    f"its experts (this MoE: act = {c.activation}, routing = {c.routing}"
                    f"{''.join(', ' + v for v in sorted(variants))})")
        return None
    if c.kind == "mlp":
        return None if c.activation == "swiglu" and not c.bias else "Llama-4's MLPs are SwiGLU without biases"
    return f"Llama-4 has no {c.kind} layers"


LAYOUT = dict(description="Llama-4 (RoPE or NoPE attention, global or chunked, each followed by a MoE with a "
                          "shared expert or a SwiGLU MLP)",
              family="mixtral", paired=True, mixers=("attention",), ffns=("mlp", "moe"),
              not_mixer="Llama-4 has attention mixers only", not_ffn="expected the MoE or MLP that follows each mixer",
              own=misfit)


def _flags(r: Reader, key: str, layers: int) -> list[bool] | None:
    """A list of one 0/1 (or true/false) per layer; None when absent or empty (transformers' default then)."""
    value = r.raw(key, None)
    if not value:
        return None
    if not isinstance(value, list) or len(value) != layers or any(v not in (0, 1) for v in value):
        raise r.fail(f"'{key}' must list num_hidden_layers = {layers} of 0 / 1, got {show_value(value)}")
    return [bool(v) for v in value]


def read(r: Reader) -> dict:
    """The plan fields of a Llama4TextConfig (configs.plan_from_config)."""
    vocab = r.int("vocab_size", 202048)
    d = r.int("hidden_size", 5120)
    layers = r.layers("num_hidden_layers", 48)
    eps = r.eps("rms_norm_eps", 1e-5)
    tied = r.bool("tie_word_embeddings", False)
    r.act()
    heads = r.int("num_attention_heads", 40)
    explicit_null = "num_key_value_heads" in r.cfg and r.cfg["num_key_value_heads"] is None
    kv, head_dim = dims(r, d, heads, 128, heads if explicit_null else 8)
    bias = r.bool("attention_bias", False)
    theta, scaling, _ = rope(r, 500000.0, head_dim, scalings=("linear", "yarn"))
    interval = r.int("no_rope_layer_interval", 4)
    use_rope = _flags(r, "no_rope_layers", layers) or [(i + 1) % interval != 0 for i in range(layers)]
    chunk = r.int("attention_chunk_size", 8192) if r.present("attention_chunk_size") or \
        "attention_chunk_size" not in r.cfg else None
    r.raw("attention_chunk_size", None)
    types = r.raw("layer_types", None)
    if types is None:
        types = ["chunked_attention" if u and chunk is not None else "full_attention" for u in use_rope]
    if not isinstance(types, list) or len(types) != layers or any(t not in _TYPES for t in types):
        raise r.fail(f"'layer_types' must list num_hidden_layers = {layers} of 'full_attention' / "
                     f"'chunked_attention', got {show_value(types)}")
    if chunk is None and "chunked_attention" in types:
        raise r.fail("'attention_chunk_size' is null but 'layer_types' has chunked_attention layers")
    qk_norm = r.bool("use_qk_norm", True)
    tuning = r.raw("attn_temperature_tuning", True)
    if not isinstance(tuning, (bool, int)) or isinstance(tuning, float):  # published configs say true or 4
        raise r.fail(f"'attn_temperature_tuning' must be true or false, got {show_value(tuning)}")
    temperature = dict(temperature_floor=r.int("floor_scale", 8192), temperature_scale=r.float("attn_scale", 0.1))
    experts = r.int("num_local_experts", 16)
    top_k = r.int("num_experts_per_tok", 1)
    d_ff = r.int("intermediate_size", 8192)
    d_ff_mlp = r.int("intermediate_size_mlp", 16384)
    step = r.int("interleave_moe_layer_step", 1)
    moe_layers = r.raw("moe_layers", None)
    if moe_layers is None:
        moe_at = [(i + 1) % step == 0 for i in range(layers)]
    else:
        moe_at = [i in read_layer_indices(r, "moe_layers", layers) for i in range(layers)]
    if any(moe_at) and top_k > experts:
        raise r.fail(f"num_experts_per_tok {top_k} > num_local_experts {experts}")
    definitions, legend, symbols = {}, {}, []
    names = {(True, False): ("rope", "R"), (True, True): ("local", "C"), (False, False): ("nope", "N"),
             (False, True): ("nope_local", "K")}
    for u, t in zip(use_rope, types):
        name, symbol = names[(u, t == "chunked_attention")]
        if name not in definitions:
            values = dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta if u else None,
                          rope_scaling=scaling if u else None, qkv_bias=bias, out_bias=bias, qk_l2_norm=qk_norm and u,
                          chunk=chunk if t == "chunked_attention" else None,
                          **(temperature if tuning and not u else {}))
            definitions[name], legend[symbol] = ("attention", hf_facet("attention").call(values)), name
        symbols.append(symbol)
    if any(moe_at):
        moe = dict(experts=experts, top_k=top_k, d_ff=d_ff, routing="sigmoid_topk", shared_d_ff=d_ff,
                   weight_input=True)
        definitions["moe"], legend["E"] = ("moe", hf_facet("moe").call(moe)), "moe"
    if not all(moe_at):
        definitions["ffn"], legend["-"] = ("mlp", hf_facet("mlp").call(dict(d_ff=d_ff_mlp, act="swiglu"))), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple(s + ("E" if e else "-") for s, e in zip(symbols, moe_at)), hf=dict(head_dim=head_dim))


def fits(ir) -> bool:
    """Whether export picks Llama-4: attention + (MoE or MLP) pairs with a weight_input MoE or chunked or L2-normed
    attention (what only Llama-4 has among the supported families)."""
    layers = ir.layers
    if len(layers) % 2 or any(x.kind != "attention" for x in layers[0::2]) or \
            any(x.kind not in ("mlp", "moe") for x in layers[1::2]):
        return False
    return any(x.kind == "moe" and x.mixer.weight_input for x in layers) or \
        any(x.mixer.chunk is not None or x.mixer.qk_l2_norm or x.mixer.temperature_floor is not None
            for x in layers[0::2])


def config(ir, base: dict, eps: float) -> dict:
    """The config.json fields of a model `fits` accepted (HFError for what Llama-4 cannot hold)."""
    from ltmdsl.hf.export import _one

    why = next((w for x in ir.layers for w in [misfit(x.mixer)] if w), None)
    if why:
        raise HFError(why)
    attns = [x.mixer for x in ir.layers[0::2]]
    ffns = [x.mixer for x in ir.layers[1::2]]
    a = _one([replace(x, rope_theta=None, rope_scaling=None, qk_l2_norm=False, chunk=None, temperature_floor=None,
                      temperature_scale=None) for x in attns],
             "attention settings other than RoPE, qk_l2_norm, chunk and temperature (Llama-4 has one)")
    nope = [x for x in attns if x.rope_theta is None]
    floor, temperature = _one([(x.temperature_floor, x.temperature_scale) for x in nope],
                              "temperature tuning of the NoPE layers (attn_temperature_tuning, floor_scale and "
                              "attn_scale are one setting)") if nope else (None, None)
    roped = [x for x in attns if x.rope_theta is not None]
    theta, scaling, qk_norm = _one([(x.rope_theta, x.rope_scaling, x.qk_l2_norm) for x in roped],
                                   "RoPE settings and qk_l2_norm of the RoPE layers") if roped else (5e5, None, False)
    chunks = sorted({x.chunk for x in attns if x.chunk is not None})
    if len(chunks) > 1:
        raise HFError(f"Llama-4's chunked layers share one attention_chunk_size, not {chunks}")
    moes = [f for f in ffns if f.kind == "moe"]
    dense = [f for f in ffns if f.kind == "mlp"]
    moe = _one(moes, "MoE settings (Llama-4 has one)") if moes else None
    mlp = _one(dense, "dense MLP settings (Llama-4 has one intermediate_size_mlp)") if dense else None
    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    extra = {}
    if scaling is not None:
        scaled = scaling_fields(scaling)
        rope_parameters = {**scaled["rope_scaling"], "rope_theta": theta}
        extra = {k: v for k, v in scaled.items() if k == "max_position_embeddings"}
    return {**base, "model_type": MODEL_TYPE, "num_hidden_layers": len(attns), "rms_norm_eps": eps,
            "hidden_act": "silu", "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
            "head_dim": a.head_dim, "attention_bias": a.qkv_bias, "rope_parameters": rope_parameters, **extra,
            "no_rope_layers": [int(x.rope_theta is not None) for x in attns],
            "attention_chunk_size": chunks[0] if chunks else None,
            "layer_types": ["chunked_attention" if x.chunk is not None else "full_attention" for x in attns],
            "use_qk_norm": qk_norm, "attn_temperature_tuning": floor is not None,
            **({"floor_scale": floor, "attn_scale": temperature} if floor is not None else {}),
            "moe_layers": [i for i, f in enumerate(ffns) if f.kind == "moe"],
            "num_local_experts": moe.experts if moe else 1, "num_experts_per_tok": moe.top_k if moe else 1,
            "intermediate_size": moe.d_ff if moe else 1, "intermediate_size_mlp": mlp.d_ff if mlp else 1}


#: the multimodal llama4 config's keys that belong to the vision part or are image token ids
_VISION_KEYS = ("vision_config", "boi_token_index", "eoi_token_index", "image_token_index", "boi_token_id",
                "eoi_token_id", "image_token_id")


def read_multimodal(r: Reader) -> dict:
    """llama4 (Llama-4 Scout, Maverick): the text decoder of `text_config` (read as llama4_text); the vision part
    left out with a NOTE."""
    return text_decoder(r, read, MODEL_TYPE, _VISION_KEYS)
