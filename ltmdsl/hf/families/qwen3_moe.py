"""Qwen3-MoE (model_type qwen3_moe; Qwen3-30B-A3B, Qwen3-235B-A22B), as transformers' Qwen3MoeForCausalLM.

Every HF layer is Qwen3 attention (per-head RMSNorm of q and k before RoPE, `attention_bias` on q, k, v and o,
head_dim from `head_dim` or hidden_size / heads) then the sparse MoE block: a softmax router `mlp.gate`, the
top `num_experts_per_tok` of `num_experts` SwiGLU experts of `moe_intermediate_size`, their weights
renormalised when `norm_topk_prob`. Layers listed in `mlp_only_layers`, those with (i + 1) %
decoder_sparse_step != 0 (0-based i) and all of them when num_experts is 0 have a dense SwiGLU MLP of
`intermediate_size` instead. With `use_sliding_window` every layer's attention slides over `sliding_window`
tokens (Qwen3MoeConfig has no max_window_layers: transformers ignores that key of the published configs).
Experts are stored per expert (`mlp.experts.{j}.gate_proj`...) or fused (`mlp.experts.gate_up_proj`).
"""

from __future__ import annotations

from dataclasses import replace

from ltmdsl.hf import HFError
from ltmdsl.hf.reader import Reader, dims, rope
from ltmdsl.hf.spec import show_value
from ltmdsl.kinds.attention_hf import scaling_fields as rope_scaling_fields
from ltmdsl.kinds.attention_hf import unmapped_variants
from ltmdsl.kinds.hf import hf_facet

MODEL_TYPE = "qwen3_moe"
ARCH = "Qwen3MoeForCausalLM"


def read_layer_indices(r: Reader, key: str, layers: int) -> list[int]:
    """A list of 0-based layer indices below `layers` (null: none)."""
    value = r.raw(key, None) or []
    if not isinstance(value, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layers
                                          for i in value):
        raise r.fail(f"'{key}' must list 0-based layer indices below num_hidden_layers = {layers}, "
                     f"got {show_value(value)}")
    return value


def aliased_int(r: Reader, key: str, alias: str, default: int, minimum: int = 1) -> int:
    """An integer a config class reads under two names (its `attribute_map`: transformers 5 saves the alias);
    either one, and both equal when both are set."""
    if r.present(alias):
        value = r.int(alias, minimum=minimum)
        if r.present(key) and r.int(key, minimum=minimum) != value:
            raise r.fail(f"'{key}' {show_value(r.raw(key))} disagrees with '{alias}' {value}")
        r.raw(key, None)
        return value
    r.raw(alias, None)
    return r.int(key, default, minimum=minimum)


def read(r: Reader) -> dict:
    """The plan fields of a Qwen3-MoE config (configs.plan_from_config)."""
    vocab = r.int("vocab_size", 151936)
    d = r.int("hidden_size", 2048)
    layers = r.layers("num_hidden_layers", 24)
    eps = r.eps("rms_norm_eps", 1e-6)
    tied = r.bool("tie_word_embeddings", False)
    r.act()
    heads = r.int("num_attention_heads", 32)
    kv, head_dim = dims(r, d, heads, None, 4)
    theta, scaling, _ = rope(r, 10000.0, head_dim, scalings=("yarn",))
    bias = r.bool("attention_bias", False)
    window = r.int("sliding_window", 4096) if r.bool("use_sliding_window", False) else None
    r.raw("sliding_window", None)
    r.raw("max_window_layers", None)  # not a Qwen3MoeConfig field: transformers never reads it
    experts = aliased_int(r, "num_experts", "num_local_experts", 128, minimum=0)
    top_k = r.int("num_experts_per_tok", 8)
    moe_d_ff = r.int("moe_intermediate_size", 768)
    d_ff = r.int("intermediate_size", 6144)
    routing = "softmax_topk_renorm" if r.bool("norm_topk_prob", False) else "softmax_topk"
    step = r.int("decoder_sparse_step", 1)
    only = read_layer_indices(r, "mlp_only_layers", layers)
    moe_at = [experts > 0 and i not in only and (i + 1) % step == 0 for i in range(layers)]
    if any(moe_at) and top_k > experts:
        raise r.fail(f"num_experts_per_tok {top_k} > num_experts {experts}")
    attention = dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                     window=window, qkv_bias=bias, out_bias=bias, qk_norm=True)
    definitions = {"attn": ("attention", hf_facet("attention").call(attention))}
    legend = {"A": "attn"}
    if any(moe_at):
        moe = dict(experts=experts, top_k=top_k, d_ff=moe_d_ff, routing=routing)
        definitions["moe"], legend["E"] = ("moe", hf_facet("moe").call(moe)), "moe"
    if not all(moe_at):
        definitions["ffn"], legend["-"] = ("mlp", hf_facet("mlp").call(dict(d_ff=d_ff, act="swiglu"))), "ffn"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple("AE" if e else "A-" for e in moe_at),
                hf=dict(mlp_only_layers=sorted(set(only)), decoder_sparse_step=step))


def fits(ir) -> bool:
    """Whether export picks Qwen3-MoE: attention with qk_norm, each followed by an MLP or MoE, some MoE."""
    layers = ir.layers
    return len(layers) % 2 == 0 and all(x.kind == "attention" for x in layers[0::2]) and \
        all(x.kind in ("mlp", "moe") for x in layers[1::2]) and any(x.kind == "moe" for x in layers[1::2]) and \
        all(x.mixer.qk_norm for x in layers[0::2])


def misfit(c) -> str | None:
    """Why a Qwen3-MoE layer cannot be this attention, MoE or MLP (None: it can)."""
    if c.kind == "attention":
        others = unmapped_variants(replace(c, rope_scaling=None))
        if not c.qk_norm or c.rope_theta is None or others or c.rope_dim is not None or c.qkv_bias != c.out_bias:
            return ("Qwen3-MoE attention has qk_norm, RoPE over the whole head and one attention_bias on q, k, v and o"
                    + (f"; not {', '.join(others)}" if others else ""))
        if c.rope_scaling is not None and c.rope_scaling.kind not in ("llama3", "yarn"):
            return f"Qwen3-MoE's RoPE scalings are llama3 or yarn, not {c.rope_scaling.kind}"
        return None
    if c.kind == "moe":
        if c.activation != "swiglu" or c.routing not in ("softmax_topk_renorm", "softmax_topk") or c.variants():
            return ("Qwen3-MoE's experts are SwiGLU, routed by softmax_topk or softmax_topk_renorm, with no shared "
                    f"expert, biases or other routing variant (this MoE: act = {c.activation}, routing = {c.routing}"
                    f"{''.join(', ' + v for v in c.variants())})")
        return None
    if c.kind == "mlp":
        return None if c.activation == "swiglu" and not c.bias else "Qwen3-MoE's dense MLPs are SwiGLU without biases"
    return f"Qwen3-MoE has no {c.kind} layers"


LAYOUT = dict(description="Qwen3-MoE (RoPE attention with qk_norm, each followed by a SwiGLU MoE or MLP)",
              family="mixtral", paired=True, mixers=("attention",), ffns=("mlp", "moe"),
              not_mixer="Qwen3-MoE has attention mixers only",
              not_ffn="expected the MLP or MoE that follows each mixer",
              own=misfit)


def config(ir, base: dict, eps: float) -> dict:
    """The config.json fields of a model `fits` accepted (HFError for what Qwen3-MoE cannot hold)."""
    from ltmdsl.hf.export import _one

    why = next((w for x in ir.layers for w in [misfit(x.mixer)] if w), None)
    if why:
        raise HFError(why)
    attn = _one([x.mixer for x in ir.layers[0::2]], "attention settings (Qwen3-MoE has one)")
    ffns = [x.mixer for x in ir.layers[1::2]]
    # Qwen3's fields (heads, head_dim, bias, window); the RoPE scaling (llama3 or yarn) is written here
    fields = hf_facet("attention").write(replace(attn, rope_scaling=None), "qwen3", ir.d_model)
    fields.update(rope_scaling_fields(attn.rope_scaling))
    window = fields.pop("sliding_window")
    moe = _one([f for f in ffns if f.kind == "moe"], "MoE settings (Qwen3-MoE has one)")
    dense = [f for f in ffns if f.kind == "mlp"]
    out = {**base, "model_type": MODEL_TYPE, "num_hidden_layers": len(ffns), "rms_norm_eps": eps,
           "hidden_act": "silu", **fields, "head_dim": attn.head_dim, "use_sliding_window": window is not None,
           "sliding_window": window, "num_experts": moe.experts, "num_experts_per_tok": moe.top_k,
           "moe_intermediate_size": moe.d_ff, "norm_topk_prob": moe.renormalise, "decoder_sparse_step": 1,
           "mlp_only_layers": [i for i, f in enumerate(ffns) if f.kind == "mlp"]}
    if dense:
        out["intermediate_size"] = _one(dense, "dense MLP settings (Qwen3-MoE has one intermediate_size)").d_ff
    return out
