"""gpt-oss (model_type gpt_oss; gpt-oss-20b, gpt-oss-120b), as transformers' GptOssForCausalLM.

Every HF layer is attention then a mixture of experts:
- attention with q/k/v/o biases (`attention_bias`, default true), head_dim 64, a learned sink logit per head
  (`self_attn.sinks`: `sinks = true`), a window of `sliding_window` tokens on the layers `layer_types` calls
  "sliding_attention" (by default the even 0-based ones) and global attention on the others; RoPE with base
  150000 and, when the config states no RoPE at all, the YaRN that GptOssConfig fills in (factor 32 over 4096
  tokens, beta_fast 32, beta_slow 1, truncate false);
- the MoE: a router with a bias (`mlp.router`) whose top `num_experts_per_tok` logits of `num_local_experts`
  (alias num_experts) are softmaxed (`topk_softmax`), and experts with biases applying the clamped SwiGLU
  (`swiglu_limit`, `swiglu_alpha`) of width `intermediate_size`. Their weights exist only fused and transposed:
  `experts.gate_up_proj [E, d, 2F]` with gate and up columns interleaved, `gate_up_proj_bias [E, 2F]` likewise,
  `down_proj [E, F, d]` and `down_proj_bias [E, d]` (moe_hf.FUSED_T).
`hidden_act` is not read by transformers' gpt-oss (the experts' activation is fixed); the original OpenAI keys
`experts_per_token` and `initial_context_length` are not read either, and must agree with num_experts_per_tok
and (under YaRN) its original context when given. Published checkpoints are MXFP4-quantised (`quantization_config`):
import-hf counts them; from_hf needs dequantised (bf16 / fp32) weights.
"""

from __future__ import annotations

from dataclasses import replace

from ltmdsl.hf import HFError
from ltmdsl.hf.families.qwen3_moe import aliased_int
from ltmdsl.hf.reader import Reader, dims, rope
from ltmdsl.hf.spec import show_value
from ltmdsl.ir import RopeScaling
from ltmdsl.kinds.attention_hf import scaling_fields
from ltmdsl.kinds.hf import hf_facet
from ltmdsl.kinds.moe import SWIGLU_ALPHA, SWIGLU_LIMIT

MODEL_TYPE = "gpt_oss"
ARCH = "GptOssForCausalLM"
#: GptOssConfig's RoPE when the config states none
DEFAULT_YARN = RopeScaling("yarn", 32.0, original_context=4096, beta_fast=32.0, beta_slow=1.0, truncate=False)
_TYPES = ("sliding_attention", "full_attention")


def layer_windows(r: Reader, layers: int, window: int | None) -> list[int | None]:
    """The window of each layer from `layer_types` (default: sliding on even 0-based layers, as GptOssConfig)."""
    types = r.raw("layer_types", None)
    if types is None:
        types = [_TYPES[i % 2] for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in _TYPES for t in types):
        raise r.fail(f"'layer_types' must list num_hidden_layers = {layers} of 'sliding_attention' / "
                     f"'full_attention', got {show_value(types)}")
    if window is None and "sliding_attention" in types:
        raise r.fail("'sliding_window' is null but 'layer_types' has sliding_attention layers")
    return [window if t == "sliding_attention" else None for t in types]


def read(r: Reader) -> dict:
    """The plan fields of a gpt-oss config (configs.plan_from_config)."""
    vocab = r.int("vocab_size", 201088)
    d = r.int("hidden_size", 2880)
    layers = r.layers("num_hidden_layers", 36)
    eps = r.eps("rms_norm_eps", 1e-5)
    tied = r.bool("tie_word_embeddings", False)
    act = r.raw("hidden_act", "silu")
    if not isinstance(act, str):  # GptOssConfig keeps it; its modules never read it
        raise r.fail(f"'hidden_act' must be a string, got {show_value(act)}")
    heads = r.int("num_attention_heads", 64)
    explicit_null = "num_key_value_heads" in r.cfg and r.cfg["num_key_value_heads"] is None  # GptOssConfig: heads
    kv, head_dim = dims(r, d, heads, 64, heads if explicit_null else 8)
    if r.present("rope_scaling") or r.present("rope_parameters"):
        theta, scaling, _ = rope(r, 150000.0, head_dim, scalings=("yarn",))
    else:
        r.expect("partial_rotary_factor", lambda v: v in (None, 1, 1.0), "1.0 (gpt-oss rotates the whole head)")
        theta, scaling = r.float("rope_theta", 150000.0), DEFAULT_YARN
        r.used.update({"rope_scaling", "rope_parameters"})
    window = r.int("sliding_window", 128) if r.present("sliding_window") or "sliding_window" not in r.cfg else None
    r.raw("sliding_window", None)
    windows = layer_windows(r, layers, window)
    bias = r.bool("attention_bias", True)
    experts = aliased_int(r, "num_local_experts", "num_experts", 128)
    top_k = r.int("num_experts_per_tok", 4)
    if top_k > experts:
        raise r.fail(f"num_experts_per_tok {top_k} > num_local_experts {experts}")
    if r.present("experts_per_token") and r.int("experts_per_token") != top_k:  # the original OpenAI config's
        raise r.fail(f"'experts_per_token' {r.cfg['experts_per_token']} disagrees with 'num_experts_per_tok' {top_k}")
    r.raw("experts_per_token", None)
    if r.present("initial_context_length"):  # the original OpenAI config's YaRN context; transformers reads none
        stated = r.int("initial_context_length")
        if scaling is not None and scaling.original_context != stated:
            key = "rope_scaling" if r.present("rope_scaling") else "rope_parameters"
            raise r.fail(f"'initial_context_length' {stated} disagrees with the YaRN original context "
                         f"{scaling.original_context} transformers uses ('{key}."
                         "original_max_position_embeddings', else 'max_position_embeddings')")
    limit = r.float("swiglu_limit", SWIGLU_LIMIT)
    alpha = r.float("swiglu_alpha", SWIGLU_ALPHA)
    d_ff = r.int("intermediate_size", 2880)
    attention = dict(heads=heads, kv_heads=kv, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                     qkv_bias=bias, out_bias=bias, sinks=True)
    definitions, legend = {}, {}
    if None in windows:
        definitions["attn"], legend["A"] = ("attention", hf_facet("attention").call(attention)), "attn"
    if window is not None and window in windows:
        definitions["swa"] = ("attention", hf_facet("attention").call({**attention, "window": window}))
        legend["S"] = "swa"
    moe = dict(experts=experts, top_k=top_k, d_ff=d_ff, act="swiglu_clamped", routing="topk_softmax",
               swiglu_limit=limit, swiglu_alpha=alpha, router_bias=True, expert_bias=True)
    definitions["moe"], legend["E"] = ("moe", hf_facet("moe").call(moe)), "moe"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple(("A" if w is None else "S") + "E" for w in windows))


def fits(ir) -> bool:
    """Whether export picks gpt-oss: the only family with attention sinks."""
    return any(x.kind == "attention" and x.mixer.sinks for x in ir.layers)


def misfit(c) -> str | None:
    """Why a gpt-oss layer cannot be this attention or MoE (None: it can)."""
    if c.kind == "attention":
        others = [n for n, on in (("qk_norm", c.qk_norm), ("gate", c.gate), ("softcap", c.softcap is not None),
                                  ("qk_l2_norm", c.qk_l2_norm), ("chunk", c.chunk is not None),
                                  ("query_pre_attn_scalar", c.query_pre_attn_scalar is not None),
                                  ("scale", c.scale is not None), ("rope_dim", c.rope_dim is not None),
                                  ("temperature_floor", c.temperature_floor is not None),
                                  ("v_head_dim", c.v_head_dim != c.head_dim), ("causal = false", not c.causal)) if on]
        if not c.sinks or c.rope_theta is None or others or c.qkv_bias != c.out_bias:
            return ("gpt-oss attention has sinks, RoPE over the whole head and one attention_bias on q, k, v and o"
                    + (f"; not {', '.join(others)}" if others else ""))
        if c.rope_scaling is not None and c.rope_scaling.kind != "yarn":
            return f"gpt-oss's RoPE is plain or yarn, not {c.rope_scaling.kind}"
        return None
    variants = set(c.variants()) - {"swiglu_limit", "swiglu_alpha"}
    if c.activation != "swiglu_clamped" or c.routing != "topk_softmax" or variants != {"router_bias", "expert_bias"}:
        return ("gpt-oss experts are routed by topk_softmax with router_bias and expert_bias and apply "
                f"swiglu_clamped, nothing else (this MoE: act = {c.activation}, routing = {c.routing}"
                f"{''.join(', ' + v for v in sorted(variants))})")
    return None


LAYOUT = dict(description="gpt-oss (attention with sinks, global or sliding, each followed by a MoE with biases "
                          "and clamped SwiGLU experts)",
              family="mixtral", paired=True, mixers=("attention",), ffns=("moe",),
              not_mixer="gpt-oss has attention mixers only", not_ffn="expected the MoE that follows each mixer",
              own=misfit)


def config(ir, base: dict, eps: float) -> dict:
    """The config.json fields of a model `fits` accepted (HFError for what gpt-oss cannot hold)."""
    from ltmdsl.hf.export import LAYOUTS, _one

    if not LAYOUTS[MODEL_TYPE].holds(ir):
        raise HFError("gpt-oss layers are attention with sinks, each followed by a MoE")
    why = next((w for x in ir.layers for w in [misfit(x.mixer)] if w), None)
    if why:
        raise HFError(why)
    attns = [x.mixer for x in ir.layers[0::2]]
    a = _one([replace(x, window=None) for x in attns], "attention settings other than the window (gpt-oss has one)")
    windows = sorted({x.window for x in attns if x.window is not None})
    if len(windows) > 1:
        raise HFError(f"gpt-oss's sliding layers share one sliding_window, not {windows}")
    moe = _one([x.mixer for x in ir.layers[1::2]], "MoE settings (gpt-oss has one)")
    rope_parameters = {"rope_type": "default", "rope_theta": a.rope_theta}
    extra = {}
    if a.rope_scaling is not None:
        scaled = scaling_fields(a.rope_scaling)
        rope_parameters = {**scaled["rope_scaling"], "rope_theta": a.rope_theta}
        extra["max_position_embeddings"] = scaled["max_position_embeddings"]
    return {**base, "model_type": MODEL_TYPE, "num_hidden_layers": len(attns), "rms_norm_eps": eps,
            "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim,
            # GptOssModel builds the sliding mask even when no layer uses it: GptOssConfig's default then
            "attention_bias": a.qkv_bias, "sliding_window": windows[0] if windows else 128,
            "rope_parameters": rope_parameters, **extra,
            "layer_types": ["full_attention" if x.window is None else "sliding_attention" for x in attns],
            "num_local_experts": moe.experts, "num_experts_per_tok": moe.top_k, "intermediate_size": moe.d_ff,
            "swiglu_limit": moe.swiglu_limit, "swiglu_alpha": moe.swiglu_alpha}
