"""Falcon-H1 (model_type falcon_h1), as transformers' FalconH1ForCausalLM.

Every HF layer is one `parallel` sub-layer, attention (RoPE, GQA, `attention_bias`) beside a Mamba-2 mixer
(`mamba_*`; inner width `mamba_d_ssm`, or mamba_expand * hidden_size when null; its gated RMSNorm only with
`mamba_rms_norm`), both on the input_layernorm's output, then a SwiGLU MLP (`intermediate_size`, `mlp_bias`).
Its muP multipliers map as follows:
- embedding_multiplier, lm_head_multiplier: the model's embed_scale and logit_scale;
- attention_in_multiplier, attention_out_multiplier, ssm_in_multiplier, ssm_out_multiplier: the parallel
  layer's a_in, a_out, b_in, b_out;
- key_multiplier (on the keys, before RoPE): the attention's `scale` = key_multiplier * head_dim^-1/2 (the
  scores are linear in the keys, RoPE included);
- ssm_multipliers (the five sections z, x, B, C, dt of in_proj's output) and mlp_multipliers (gate_proj's output
  before the activation, down_proj's output) are folded into those weights and biases as they load (op `copy`
  with `scales`); export writes the folded weights and multipliers of 1, so a round trip is the same model with
  the multipliers inside its weights.
Keys of the published configs that transformers never reads are accepted where they agree with what it computes
(`attn_layer_indices` null, `mamba_use_mlp` true; `mlp_expansion_factor`, whose width `intermediate_size` states).
`projectors_bias` (the Mamba-2 out_proj bias) must equal `mamba_proj_bias` (its in_proj bias): the language's
mamba2 has one `proj_bias` for both. Norms are RMSNorms of `rms_norm_eps`.
"""

from __future__ import annotations

import math

from ltmdsl.hf import HFError
from ltmdsl.hf.reader import Reader, int_expand, rope, time_step_limit_ok
from ltmdsl.hf.spec import show_value
from ltmdsl.kinds.hf import hf_facet

MODEL_TYPE = "falcon_h1"
ARCH = "FalconH1ForCausalLM"
LAYOUT = dict(description="Falcon-H1 (attention beside Mamba-2 in one parallel sub-layer, each followed by a "
                          "SwiGLU MLP)", family=MODEL_TYPE, paired=True, mixers=("parallel",), ffns=("mlp",),
              not_mixer="Falcon-H1's mixers are parallel layers of attention and Mamba-2",
              not_ffn="expected the MLP that follows each mixer")


def _multipliers(r: Reader, key: str, n: int) -> list[float]:
    value = r.raw(key, None)
    if value is None:
        return [1.0] * n
    if not isinstance(value, list) or len(value) != n or any(
            not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v == 0 for v in value):
        raise r.fail(f"'{key}' must list {n} finite nonzero numbers, got {show_value(value)}")
    return [float(v) for v in value]


def read(r: Reader) -> dict:
    """The plan fields of a Falcon-H1 config (configs.plan_from_config)."""
    vocab = r.int("vocab_size", 128000)
    d = r.int("hidden_size", 4096)
    layers = r.layers("num_hidden_layers", 32)
    eps = r.eps("rms_norm_eps", 1e-5)
    tied = r.bool("tie_word_embeddings", False)
    r.act()  # the Mamba-2 mixer's and the MLP's activation alike
    # keys of the published configs that neither FalconH1Config nor the model reads (the original code's), accepted
    # where they say what transformers computes anyway
    r.expect("attn_layer_indices", lambda v: v is None, "null (transformers' Falcon-H1 has attention in every layer)")
    r.expect("mamba_use_mlp", lambda v: v in (None, True), "true (every Falcon-H1 layer has its MLP)")
    if r.present("mlp_expansion_factor"):
        r.float("mlp_expansion_factor")  # the original code's width rule; intermediate_size is the width
    for key in ("layers_block_type", "layer_types"):  # a property of FalconH1Config: every layer is "hybrid"
        types = r.raw(key, None)
        if types is not None and types != ["hybrid"] * layers:
            raise r.fail(f"'{key}' must list 'hybrid' for each of the {layers} layers, got {show_value(types)}")
    # attention (branch a)
    heads = r.int("num_attention_heads", 32)
    kv = r.int("num_key_value_heads", 8)
    if heads % kv:
        raise r.fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if not r.present("head_dim") and d % heads:
        raise r.fail(f"hidden_size {d} is not a multiple of num_attention_heads {heads}; set head_dim")
    head_dim = r.int("head_dim", d // heads)
    theta, scaling, _ = rope(r, 10000.0, head_dim)
    key_multiplier = r.float("key_multiplier", 1.0)
    attention = dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                     qkv_bias=r.bool("attention_bias", False), out_bias=r.bool("attention_bias", False),
                     scale=None if key_multiplier == 1.0 else key_multiplier * head_dim ** -0.5)
    # Mamba-2 (branch b)
    expand = int_expand(r, "mamba_expand", 2)
    d_inner = r.int("mamba_d_ssm", 1024) if r.cfg.get("mamba_d_ssm", 1024) is not None else expand * d
    r.raw("mamba_d_ssm", None)
    ssm_heads = r.int("mamba_n_heads", 128)
    if r.raw("mamba_d_head", "auto") == "auto":  # as FalconH1Config: the inner width split over the heads
        if d_inner % ssm_heads:
            raise r.fail(f"mamba_n_heads {ssm_heads} does not divide the Mamba-2 inner width {d_inner} "
                         "('mamba_d_ssm', or mamba_expand * hidden_size)")
        ssm_head_dim = d_inner // ssm_heads
    else:
        ssm_head_dim = r.int("mamba_d_head")
    if ssm_head_dim * ssm_heads != d_inner:
        raise r.fail(f"mamba_n_heads * mamba_d_head = {ssm_heads * ssm_head_dim} != the Mamba-2 inner width {d_inner} "
                     "('mamba_d_ssm', or mamba_expand * hidden_size)")
    groups = r.int("mamba_n_groups", 1)
    if ssm_heads % groups:
        raise r.fail(f"mamba_n_heads {ssm_heads} is not a multiple of mamba_n_groups {groups}")
    r.expect("time_step_limit", time_step_limit_ok, "[0.0, inf]")
    proj_bias = r.bool("mamba_proj_bias", False)
    r.expect("projectors_bias", lambda v: v in (None, proj_bias), f"{str(proj_bias).lower()} ('mamba_proj_bias': "
             "ltmdsl's mamba2 has one proj_bias for its in_proj and out_proj)", False)
    gated_norm = r.bool("mamba_rms_norm", False)
    if gated_norm:
        r.expect("mamba_norm_before_gate", lambda v: v is False, "false with mamba_rms_norm (the language's gated "
                 "norm is RMSNorm(y * silu(z)))", True)
    r.bool("mamba_norm_before_gate", True)  # without the norm it does not apply
    d_state = r.int("mamba_d_state", 256)
    ssm = dict(d_state=d_state, head_dim=ssm_head_dim, n_groups=groups, expand=expand,
               d_conv=r.int("mamba_d_conv", 4), chunk=r.int("mamba_chunk_size", 256),
               conv_bias=r.bool("mamba_conv_bias", True), proj_bias=proj_bias, gated_norm=gated_norm)
    if ssm_heads * ssm_head_dim != expand * d:
        ssm["heads"] = ssm_heads
    ffn = hf_facet("mlp").read(r, _ctx(d))
    # the multipliers: the parallel layer's four, the model's two, the rest folded into weights
    parallel = dict(a="attn", b="ssm", a_in=r.float("attention_in_multiplier", 1.0),
                    a_out=r.float("attention_out_multiplier", 1.0), b_in=r.float("ssm_in_multiplier", 1.0),
                    b_out=r.float("ssm_out_multiplier", 1.0))
    z, x, b, c, dt = _multipliers(r, "ssm_multipliers", 5)
    gate, down = _multipliers(r, "mlp_multipliers", 2)
    gn = groups * d_state
    sections = ((d_inner, z), (d_inner, x), (gn, b), (gn, c), (ssm_heads, dt))
    scales = {f"mamba.in_proj.{p}": sections for p in ("weight", "bias")}
    scales.update({f"feed_forward.gate_proj.{p}": ((ffn["d_ff"], gate),) for p in ("weight", "bias")})
    scales.update({f"feed_forward.down_proj.{p}": ((d, down),) for p in ("weight", "bias")})
    scales = {k: v for k, v in scales.items() if any(m != 1.0 for _, m in v)}
    out = dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied,
               definitions={"attn": ("attention", hf_facet("attention").call(attention)),
                            "ssm": ("mamba2", hf_facet("mamba2").call(ssm)),
                            "mix": ("parallel", hf_facet("parallel").call(parallel)),
                            "ffn": ("mlp", hf_facet("mlp").call(ffn))},
               legend={"P": "mix", "-": "ffn"}, tokens=("P-",) * layers, hf=dict(tensor_scales=scales))
    for key, field in (("embedding_multiplier", "embed_scale"), ("lm_head_multiplier", "logit_scale")):
        value = r.float(key, 1.0)
        if value != 1.0:
            out[field] = value
    return out


def _ctx(d: int):
    from ltmdsl.hf.facet import ReadContext

    return ReadContext(MODEL_TYPE, d)


def fits(ir) -> bool:
    """Whether export picks Falcon-H1: parallel layers, each followed by an MLP."""
    from ltmdsl.hf.export import LAYOUTS

    return any(x.kind == "parallel" for x in ir.layers) and LAYOUTS[MODEL_TYPE].holds(ir)


def key_multiplier(scale: float | None, head_dim: int) -> float:
    """The key_multiplier m whose import, m * head_dim^-1/2, is exactly the attention's scale (neighbours of
    scale * sqrt(head_dim) are tried: the product does not always round back)."""
    if scale is None:
        return 1.0
    low = high = scale / head_dim ** -0.5
    for _ in range(8):
        for m in (low, high):
            if m * head_dim ** -0.5 == scale:
                return m
        low, high = math.nextafter(low, 0.0), math.nextafter(high, math.inf)
    raise HFError(f"attention scale {scale!r} is key_multiplier * head_dim^-1/2 for no floating-point key_multiplier")


def config(ir, base: dict, eps: float) -> dict:
    """The config.json fields of a model `fits` accepted (HFError for what Falcon-H1 cannot hold)."""
    from ltmdsl.hf.export import _one

    if ir.residual_scale != 1.0 or ir.logit_cap is not None:
        raise HFError("Falcon-H1 has no residual multiplier and no logit soft cap")
    mix = _one([x.mixer for x in ir.layers[0::2]], "parallel settings (Falcon-H1 has one)")
    ffn = _one([x.mixer for x in ir.layers[1::2]], "MLP settings (Falcon-H1 has one intermediate_size)")
    fields = hf_facet("parallel").write(mix, MODEL_TYPE, ir.d_model)
    a, m = mix.a, mix.b
    if a.window is not None or a.qk_norm or a.rope_theta is None or a.rope_dim is not None or a.qkv_bias != a.out_bias \
            or a.query_pre_attn_scalar is not None or a.v_head_dim != a.head_dim:
        raise HFError("Falcon-H1 attention has RoPE over the whole head, no window, no qk_norm, one attention_bias for "
                      "q, k, v and o, and v_head_dim = head_dim")
    from ltmdsl.kinds.attention_hf import rope_scaling_fields, unmapped_variants

    if unmapped_variants(a):
        raise HFError(f"attention variants ({', '.join(unmapped_variants(a))}) are not mapped to Falcon-H1")
    scaled = rope_scaling_fields(a)
    out = {**base, "model_type": MODEL_TYPE, "num_hidden_layers": len(ir.layers) // 2, "rms_norm_eps": eps,
           "hidden_act": "silu", "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
           "head_dim": a.head_dim, "attention_bias": a.qkv_bias,
           "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta, **scaled.get("rope_scaling", {})},
           "key_multiplier": key_multiplier(a.scale, a.head_dim), **fields,
           "mamba_d_ssm": m.d_inner, "mamba_n_heads": m.heads, "mamba_d_head": m.head_dim,
           "mamba_n_groups": m.n_groups, "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv,
           "mamba_expand": m.expand, "mamba_chunk_size": m.chunk, "mamba_conv_bias": m.conv_bias,
           "mamba_proj_bias": m.proj_bias, "projectors_bias": m.proj_bias, "mamba_rms_norm": m.gated_norm,
           "mamba_norm_before_gate": False, "ssm_multipliers": [1.0] * 5, "mlp_multipliers": [1.0, 1.0],
           "embedding_multiplier": ir.embed_scale, "lm_head_multiplier": ir.logit_scale,
           **hf_facet("mlp").write(ffn, MODEL_TYPE, ir.d_model)}
    if scaled:
        out["max_position_embeddings"] = scaled["max_position_embeddings"]
    return out
