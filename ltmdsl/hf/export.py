"""Runtime model -> Hugging Face folder (`config.json` + `model.safetensors`) that transformers loads.

    ltmdsl.hf.export_hf(model, "out/")                 # a runtime model (ltmdsl.build / from_hf)
    ltmdsl.hf.export_hf("model.ltm", "out/", seed=0)   # a spec: the weights its `build(seed=...)` draws

`config_from_ir` picks the one family whose layout the resolved model has (Llama, Mistral, Qwen2, Qwen3,
Mixtral, Mamba, Mamba-2, Jamba, dense Nemotron-H, Bamba) and writes its config. To be sure nothing is lost,
the config is imported again (configs.py) and must resolve to exactly the same sub-layers, norms and sizes;
models with no exact Hugging Face counterpart (shared blocks, mixed attention shapes, layernorm, ...) are an
`HFError` that says why and names the sub-layers the closest family has no place for (`misfits`). The folder appears atomically: it is written under a temporary name next to the
destination and renamed into place, so an error leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os

from ltmdsl import atomic
from ltmdsl.tensorfile import TensorFileError, check_fits
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import plan_from_config
from ltmdsl.hf.spec import Plan
from ltmdsl.hf.weights import expert_counts, to_hf
from ltmdsl.ir import ModelIR
from ltmdsl.kinds.attention import AttentionConfig

_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mamba": "MambaForCausalLM",
         "mamba2": "Mamba2ForCausalLM", "jamba": "JambaForCausalLM", "nemotron_h": "NemotronHForCausalLM",
         "bamba": "BambaForCausalLM"}


def _one(values, what: str):
    """The single distinct value of `values`, else an HFError saying HF configs hold one `what`."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) != 1:
        raise HFError(f"the layers differ in {what}, which one Hugging Face config cannot express")
    return distinct[0]


def _period(positions: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with `i % period == offset` exactly at the True positions; None if there is none."""
    n = len(positions)
    if not any(positions):
        return n + 1, n
    for period in range(1, n + 1):
        for offset in range(period):
            if all(p == (i % period == offset) for i, p in enumerate(positions)):
                return period, offset
    return None


def _attention_fields(attn: AttentionConfig, d: int) -> dict:
    if attn.v_head_dim != attn.head_dim or not attn.causal:
        raise HFError("attention with v_head_dim != head_dim or causal = false has no Hugging Face counterpart")
    out = {"num_attention_heads": attn.heads, "num_key_value_heads": attn.kv_heads}
    if attn.head_dim * attn.heads != d:
        out["head_dim"] = attn.head_dim
    return out


def _rope_scaling_fields(attn: AttentionConfig) -> dict:
    """`rope_scaling` in the transformers 4 form (`rope_theta` stays top-level), which transformers 4.43+ and 5
    both load; plus `max_position_embeddings` = factor * original_context, the context the scaling is for,
    because transformers warns when original_max_position_embeddings is not below max_position_embeddings
    (and the llama3 forward pass does not read it)."""
    s = attn.rope_scaling
    if s is None:
        return {}
    if s.kind != "llama3":
        raise HFError(f"rope scaling {s.kind} has no Hugging Face counterpart (supported: llama3)")
    return {"rope_scaling": {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_context},
            "max_position_embeddings": max(s.original_context + 1, math.ceil(s.factor * s.original_context))}


def config_from_ir(ir: ModelIR) -> dict:
    """The Hugging Face config.json dict of a resolved model (see the module docstring).

    A refusal names the sub-layers (index, definition name, kind) that the closest supported family has no
    place for, and why (`misfits`); where every sub-layer has a place, the reason is one the layers share
    (they differ in a setting one config holds once, ...).
    """
    try:
        return _family_config(ir)
    except HFError as e:
        if e.message.startswith(_NO_COUNTERPART):
            raise
        detail = misfits(ir)
        raise HFError(f"{e.message}. {detail}" if detail else e.message, e.path) from None


_NO_COUNTERPART = "this stack has no Hugging Face counterpart"


def _family_config(ir: ModelIR) -> dict:
    """config_from_ir without the per-layer explanation of a refusal."""
    layers = ir.layers
    if any(layer.tie_group is not None for layer in layers):
        raise HFError("shared (weight-tied) blocks have no Hugging Face counterpart among the supported families")
    norm = _one([layer.norm for layer in layers] + [ir.final_norm], "norm")
    if norm.kind != "rmsnorm":
        raise HFError(f"{norm.kind} has no Hugging Face counterpart among the supported families (all use rmsnorm)")
    base = {"vocab_size": ir.vocab, "hidden_size": ir.d_model, "tie_word_embeddings": ir.tie_embeddings,
            "torch_dtype": _TORCH_DTYPE.get(ir.dtype.name, "bfloat16")}
    kinds = [layer.kind for layer in layers]
    mixers = [layer.mixer for layer in layers]
    n = len(layers)
    paired = n % 2 == 0 and all(not layers[i].is_ffn and layers[i + 1].is_ffn for i in range(0, n, 2))

    if set(kinds) == {"mamba"}:
        m = _one(mixers, "Mamba settings")
        if m.inner_norms:
            raise HFError("Mamba layers with inner_norms exist in Hugging Face only inside Jamba")
        return {**base, "model_type": "mamba", "num_hidden_layers": n, "layer_norm_epsilon": norm.eps,
                "state_size": m.d_state, "conv_kernel": m.d_conv, "expand": m.expand, "time_step_rank": m.dt_rank,
                "use_conv_bias": m.conv_bias, "use_bias": m.proj_bias, "hidden_act": "silu",
                "intermediate_size": m.d_inner}
    if set(kinds) == {"mamba2"}:
        m = _one(mixers, "Mamba-2 settings")
        return {**base, "model_type": "mamba2", "num_hidden_layers": n, "layer_norm_epsilon": norm.eps,
                "num_heads": m.heads, "head_dim": m.head_dim, "state_size": m.d_state, "n_groups": m.n_groups,
                "expand": m.expand, "conv_kernel": m.d_conv, "chunk_size": m.chunk, "use_conv_bias": m.conv_bias,
                "use_bias": m.proj_bias, "hidden_act": "silu"}
    bamba = paired and set(kinds[0::2]) <= {"mamba2", "attention"} and set(kinds[1::2]) == {"mlp"} and \
        all(m.activation == "swiglu" for m in mixers[1::2]) and \
        all(m.rope_theta is not None for m in mixers[0::2] if isinstance(m, AttentionConfig))
    if any(isinstance(m, AttentionConfig) and m.rope_dim is not None for m in mixers):
        if bamba:  # the one supported family whose transformers code applies partial rotary embeddings
            return _bamba_config(ir, base, norm.eps)
        raise HFError("attention with rope_dim (partial rotary embeddings) maps back only to Bamba (Mamba-2 or "
                      "RoPE attention, each followed by a SwiGLU MLP); transformers' Llama-style families rotate "
                      "the whole head")
    if paired and all(isinstance(m, AttentionConfig) and m.rope_theta is not None for m in mixers[0::2]):
        return _transformer_config(ir, base, norm.eps)
    if paired and set(kinds[0::2]) <= {"mamba", "attention"} and \
            all(m.rope_theta is None for m in mixers[0::2] if isinstance(m, AttentionConfig)):
        return _jamba_config(ir, base, norm.eps)
    if bamba:
        return _bamba_config(ir, base, norm.eps)
    if set(kinds) <= {"mamba2", "attention", "mlp"}:
        return _nemotron_config(ir, base, norm.eps)
    raise HFError(f"{_NO_COUNTERPART}. {misfits(ir) or 'Supported families: ' + '; '.join(_FAMILIES) + '.'}")


# ---------------------------------------------------------------------------------------------------------
# Why a stack has no counterpart: the layers the closest supported family has no place for.
# ---------------------------------------------------------------------------------------------------------


def _llama_mixer(m) -> str | None:
    if m.kind != "attention":
        return "Llama-style families have attention mixers only"
    return "this attention has no RoPE (rope_theta = none)" if m.rope_theta is None else None


def _jamba_mixer(m) -> str | None:
    if m.kind == "mamba":
        return None if m.inner_norms else "Jamba's Mamba layers have inner norms (inner_norms = true)"
    if m.kind == "attention":
        return "Jamba attention has no RoPE and no window" if m.rope_theta is not None or m.window is not None \
            else None
    return "Jamba's SSM layers are Mamba-1 (mamba)"


def _bamba_mixer(m) -> str | None:
    if m.kind == "mamba2":
        return None
    if m.kind == "attention":
        return "Bamba attention has RoPE and no window" if m.rope_theta is None or m.window is not None else None
    return "Bamba's SSM layers are Mamba-2 (mamba2)"


def _swiglu_ffn(moe: bool):
    def check(m) -> str | None:
        if m.kind not in (("mlp", "moe") if moe else ("mlp",)):
            return "expected the " + ("MLP or MoE" if moe else "MLP") + " that follows each mixer"
        return None if m.activation == "swiglu" else f"its activation is {m.activation}; the family uses swiglu"
    return check


def _nemotron_layer(m) -> str | None:
    if m.kind == "mamba2":
        return None
    if m.kind == "attention":
        return "Nemotron-H attention has no RoPE and no window" if m.rope_theta is not None or m.window is not None \
            else None
    if m.kind == "mlp":
        return None if m.activation == "relu2" else f"its activation is {m.activation}; Nemotron-H MLPs use relu2"
    return f"Nemotron-H has no {m.kind} layers (dense Mamba-2, attention and relu2 MLPs only)"


#: family description -> (mixer + FFN pairs?, check of a mixer slot, check of an FFN slot / any layer)
_FAMILIES = {
    "Llama / Mistral / Mixtral / Qwen (RoPE attention, each followed by a SwiGLU MLP or MoE)":
        (True, _llama_mixer, _swiglu_ffn(True)),
    "Jamba (Mamba-1 with inner norms or attention without RoPE, each followed by a SwiGLU MLP or MoE)":
        (True, _jamba_mixer, _swiglu_ffn(True)),
    "Bamba (Mamba-2 or RoPE attention, each followed by a SwiGLU MLP)": (True, _bamba_mixer, _swiglu_ffn(False)),
    "Nemotron-H (Mamba-2, attention without RoPE and relu2 MLPs in any order)": (False, None, _nemotron_layer),
    "Mamba (Mamba-1 layers only)":
        (False, None, lambda m: None if m.kind == "mamba" and not m.inner_norms else "Mamba has Mamba-1 layers only "
                                                                                  "(without inner norms)"),
    "Mamba-2 (Mamba-2 layers only)": (False, None, lambda m: None if m.kind == "mamba2" else "Mamba-2 has Mamba-2 "
                                                                                           "layers only"),
}


def _family_misfits(ir: ModelIR, paired: bool, mixer_check, other_check) -> list[str]:
    """`layer i 'definition' (kind): why` for each sub-layer the family has no place for."""
    out = []
    n = len(ir.layers)
    for layer in ir.layers:
        m = layer.mixer
        if not paired:
            why = other_check(m)
        elif layer.index % 2 == 0:
            why = ("expected a mixer (attention or an SSM) at an even position" if layer.is_ffn
                   else "a mixer without the FFN that must follow it" if layer.index == n - 1 else mixer_check(m))
        else:
            why = f"expected the FFN after the mixer, got {m.kind}" if not layer.is_ffn else other_check(m)
        if why:
            out.append(f"layer {layer.index} '{layer.definition}' ({m.kind}): {why}")
    return out


def misfits(ir: ModelIR, shown: int = 6) -> str:
    """The closest supported family and the layers (index, definition name, kind) it has no place for, and why;
    "" when the closest family has a place for every layer."""
    ranked = sorted(((len(bad), i, name, bad) for i, (name, (paired, mixer, other)) in enumerate(_FAMILIES.items())
                     for bad in [_family_misfits(ir, paired, mixer, other)]))
    _, _, name, bad = ranked[0]
    if not bad:
        return ""
    listed = "; ".join(bad[:shown]) + (f"; and {len(bad) - shown} more" if len(bad) > shown else "")
    return (f"The closest supported family is {name}, which has no place for {len(bad)} of its {len(ir.layers)} "
            f"sub-layers: {listed}. Supported families: " + "; ".join(_FAMILIES) + ".")


def _transformer_config(ir: ModelIR, base: dict, eps: float) -> dict:
    attn_layers = [layer.mixer for layer in ir.layers[0::2]]
    ffns = [layer.mixer for layer in ir.layers[1::2]]
    _one([(a.heads, a.kv_heads, a.head_dim, a.v_head_dim, a.rope_theta, a.rope_scaling, a.qkv_bias, a.out_bias,
           a.qk_norm, a.causal) for a in attn_layers], "attention shape")
    attn = attn_layers[0]
    windows = [a.window for a in attn_layers]
    out = {**base, "num_hidden_layers": len(attn_layers), "rms_norm_eps": eps, "hidden_act": "silu",
           "rope_theta": attn.rope_theta, **_rope_scaling_fields(attn), **_attention_fields(attn, ir.d_model)}
    ffn = _one(ffns, "feed-forward settings")
    if ffn.kind == "moe":
        if ffn.routing not in ("softmax_topk_renorm", "topk_softmax") or ffn.activation != "swiglu":
            raise HFError("MoE after RoPE attention maps to Mixtral only with swiglu and softmax_topk_renorm routing")
        if attn.qkv_bias or attn.out_bias or attn.qk_norm:
            raise HFError("Mixtral attention has no biases and no qk_norm")
        return {**out, "model_type": "mixtral", "intermediate_size": ffn.d_ff, "num_local_experts": ffn.experts,
                "num_experts_per_tok": ffn.top_k, "sliding_window": _one(windows, "attention window")}
    if ffn.activation != "swiglu":
        raise HFError(f"MLP activation {ffn.activation} has no counterpart in Llama-style families (swiglu only)")
    out["intermediate_size"] = ffn.d_ff
    mixed = len(set(windows)) > 1
    if attn.qk_norm or (attn.qkv_bias and not attn.out_bias):
        if ffn.bias or (attn.qk_norm and attn.qkv_bias != attn.out_bias):
            raise HFError("Qwen2/Qwen3 have no MLP bias, and Qwen3's attention_bias covers q, k, v and o alike")
        w = [x for x in windows if x is not None]
        if len(set(w)) > 1:
            raise HFError("Qwen sliding layers share one window size")
        out.update(model_type="qwen3" if attn.qk_norm else "qwen2", use_sliding_window=bool(w),
                   sliding_window=w[0] if w else None, max_window_layers=len(windows),
                   layer_types=["sliding_attention" if x is not None else "full_attention" for x in windows])
        if attn.qk_norm:
            out.update(head_dim=attn.head_dim, attention_bias=attn.qkv_bias)
        return out
    if attn.qkv_bias != attn.out_bias:
        raise HFError("Llama's attention_bias covers q, k, v and o alike")
    if mixed:
        raise HFError("layers with different attention windows map back only to Qwen2/Qwen3 (with their biases)")
    if windows[0] is not None:
        if attn.qkv_bias or ffn.bias:
            raise HFError("Mistral (sliding window) has no attention or MLP biases")
        return {**out, "model_type": "mistral", "sliding_window": windows[0]}
    return {**out, "model_type": "llama", "attention_bias": attn.qkv_bias, "mlp_bias": ffn.bias}


def _jamba_config(ir: ModelIR, base: dict, eps: float) -> dict:
    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffns = [layer.mixer for layer in ir.layers[1::2]]
    attn_at = [m.kind == "attention" for m in mixers]
    moe_at = [f.kind == "moe" for f in ffns]
    out = {**base, "model_type": "jamba", "num_hidden_layers": len(mixers), "rms_norm_eps": eps, "hidden_act": "silu"}
    attention = [m for m in mixers if m.kind == "attention"]
    if attention:
        a = _one(attention, "attention settings")
        if a.window is not None or a.qkv_bias or a.out_bias or a.qk_norm or a.head_dim * a.heads != ir.d_model:
            raise HFError("Jamba attention has no window, biases, qk_norm or head_dim override")
        out.update(_attention_fields(a, ir.d_model))
    mambas = [m for m in mixers if m.kind == "mamba"]
    if mambas:
        m = _one(mambas, "Mamba settings")
        if not m.inner_norms:
            raise HFError("Jamba's Mamba layers have inner norms (inner_norms = true)")
        out.update(mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_dt_rank=m.dt_rank,
                   mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.proj_bias)
    d_ff = _one([f.d_ff for f in ffns], "d_ff (Jamba has one intermediate_size)")
    if any(f.activation != "swiglu" for f in ffns):
        raise HFError("Jamba's MLPs and experts use swiglu")
    out["intermediate_size"] = d_ff
    moes = [f for f in ffns if f.kind == "moe"]
    if moes:
        e = _one([(f.experts, f.top_k, f.routing) for f in moes], "MoE settings")
        if e[2] != "softmax_topk":
            raise HFError("Jamba routes with softmax_topk (no renormalisation)")
        out.update(num_experts=e[0], num_experts_per_tok=e[1])
    else:
        out.update(num_experts=1, num_experts_per_tok=1)
    a_period, e_period = _period(attn_at), _period(moe_at)
    if a_period is None or e_period is None:
        raise HFError("Jamba places attention and MoE layers by period and offset; this stack has no such period")
    out.update(attn_layer_period=a_period[0], attn_layer_offset=a_period[1],
               expert_layer_period=e_period[0], expert_layer_offset=e_period[1])
    return out


def _nemotron_config(ir: ModelIR, base: dict, eps: float) -> dict:
    symbol = {"mamba2": "M", "attention": "*", "mlp": "-"}
    out = {**base, "model_type": "nemotron_h", "layer_norm_epsilon": eps,
           "hybrid_override_pattern": "".join(symbol[layer.kind] for layer in ir.layers),
           "num_hidden_layers": len(ir.layers)}
    attention = [layer.mixer for layer in ir.layers if layer.kind == "attention"]
    if attention:
        a = _one(attention, "attention settings")
        if a.rope_theta is not None or a.window is not None or a.qk_norm or a.qkv_bias != a.out_bias:
            raise HFError("Nemotron-H attention has no RoPE, window or qk_norm")
        out.update(num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim,
                   attention_bias=a.qkv_bias)
    mambas = [layer.mixer for layer in ir.layers if layer.kind == "mamba2"]
    if mambas:
        m = _one(mambas, "Mamba-2 settings")
        out.update(mamba_num_heads=m.heads, mamba_head_dim=m.head_dim, ssm_state_size=m.d_state,
                   n_groups=m.n_groups, expand=m.expand, conv_kernel=m.d_conv, chunk_size=m.chunk,
                   use_conv_bias=m.conv_bias, use_bias=m.proj_bias)
    mlps = [layer.mixer for layer in ir.layers if layer.kind == "mlp"]
    if mlps:
        f = _one(mlps, "MLP settings")
        if f.activation != "relu2":
            raise HFError("Nemotron-H MLPs use relu2")
        out.update(intermediate_size=f.d_ff, mlp_bias=f.bias)
    return out


def _bamba_config(ir: ModelIR, base: dict, eps: float) -> dict:
    """Bamba: attention (with RoPE, partial or whole-head) at `attn_layer_indices`, Mamba-2 elsewhere, a SwiGLU
    MLP after each. rope_dim becomes rope_parameters.partial_rotary_factor = rope_dim / head_dim (transformers 5
    form, rope_theta inside), which must give back exactly rope_dim as transformers computes it."""
    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffn = _one([layer.mixer for layer in ir.layers[1::2]], "MLP settings (Bamba has one intermediate_size)")
    out = {**base, "model_type": "bamba", "num_hidden_layers": len(mixers), "rms_norm_eps": eps,
           "hidden_act": "silu", "intermediate_size": ffn.d_ff, "mlp_bias": ffn.bias,
           "attn_layer_indices": [i for i, m in enumerate(mixers) if m.kind == "attention"]}
    attention = [m for m in mixers if m.kind == "attention"]
    if attention:
        a = _one(attention, "attention settings")
        if a.window is not None or a.qk_norm or a.qkv_bias != a.out_bias:
            raise HFError("Bamba attention has no window or qk_norm, and its attention_bias covers q, k, v and o alike")
        factor = a.rotary_dim / a.head_dim
        if a.head_dim * factor != a.rotary_dim:  # the float product transformers truncates must be exact
            raise HFError(f"rope_dim {a.rotary_dim} of head_dim {a.head_dim} has no partial_rotary_factor that "
                          f"transformers turns back into {a.rotary_dim} channels")
        rope = {"rope_type": "default", "rope_theta": a.rope_theta, "partial_rotary_factor": factor}
        if a.rope_scaling is not None:
            scaled = _rope_scaling_fields(a)
            rope.update(scaled["rope_scaling"])
            out["max_position_embeddings"] = scaled["max_position_embeddings"]
        out.update(_attention_fields(a, ir.d_model), attention_bias=a.qkv_bias, rope_parameters=rope)
    mambas = [m for m in mixers if m.kind == "mamba2"]
    if mambas:
        m = _one(mambas, "Mamba-2 settings")
        if m.d_inner != m.expand * ir.d_model:
            raise HFError(f"Bamba's Mamba-2 inner width is mamba_expand * hidden_size; heads * head_dim = {m.d_inner} "
                          f"is not {m.expand} * {ir.d_model}")
        out.update(mamba_n_heads=m.heads, mamba_d_head=m.head_dim, mamba_n_groups=m.n_groups, mamba_d_state=m.d_state,
                   mamba_expand=m.expand, mamba_d_conv=m.d_conv, mamba_chunk_size=m.chunk,
                   mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.proj_bias)
    return out


def _same_model(a: ModelIR, b: ModelIR) -> str | None:
    """Why two resolved models differ in anything that matters for weights and outputs; None if they agree."""
    for what in ("vocab", "d_model", "tie_embeddings", "final_norm"):
        if getattr(a, what) != getattr(b, what):
            return f"{what} {getattr(a, what)} != {getattr(b, what)}"
    if len(a.layers) != len(b.layers):
        return f"{len(a.layers)} sub-layers != {len(b.layers)}"
    for x, y in zip(a.layers, b.layers):
        if (x.norm, x.mixer) != (y.norm, y.mixer):
            return f"sub-layer {x.index}: {x.mixer} != {y.mixer}"
    return None


def hf_plan(ir: ModelIR) -> tuple[dict, Plan]:
    """The config dict and its import plan, checked to resolve back to exactly `ir`."""
    import ltmdsl

    cfg = {"architectures": None, **config_from_ir(ir)}
    cfg["architectures"] = [_ARCH[cfg["model_type"]]]
    plan = plan_from_config(cfg, name=ir.name)
    why = _same_model(ir, ltmdsl.loads(plan.spec_text(), name=f"<{cfg['model_type']} config>").model)
    if why:
        raise HFError(f"model {ir.name} does not map back to {cfg['model_type']} exactly: {why}")
    return cfg, plan


def _model_of(source, seed: int):
    """A runtime model from a model object, a spec file (seeded weights) or a runtime checkpoint (a path)."""
    if hasattr(source, "ir") and hasattr(source, "named_parameters"):
        return source
    import ltmdsl

    path = os.fspath(source)
    if os.path.isdir(path):
        raise HFError("expected a spec (.ltm) or a runtime checkpoint (.safetensors), got a folder", path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError

        from ltmdsl.checkpoints import load_checkpoint

        try:
            return load_checkpoint(path)
        except (ValueError, OSError, SafetensorError) as e:
            raise HFError(str(e).removeprefix(f"{path}: "), path) from None
    ir = ltmdsl.load(path).model
    try:  # weights are drawn in fp32, then copied once into the Hugging Face layout
        check_fits(ir.params_total * 8, f"model {ir.name} ({ir.params_total:,} parameters, seeded weights)")
    except TensorFileError as e:
        raise HFError(str(e), path) from None
    return ltmdsl.build(ir, backend="torch", seed=seed)


def export_hf(source, out_dir, *, fused: bool = False, seed: int = 0, overwrite: bool = False) -> str:
    """Write `source` (see `_model_of`) as a Hugging Face folder at `out_dir`; returns the folder's path.

    Experts are written per expert as published checkpoints are, or in transformers 5's fused layout
    with `fused=True`. An existing non-empty `out_dir` is replaced only with `overwrite=True`.
    """
    from safetensors.torch import save_file

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise HFError("exists and is not empty (pass overwrite=True / --force to replace it)", out_dir)
    try:
        atomic.check_replaceable(out_dir)
    except atomic.NotOwnOutput as e:
        raise HFError(str(e).removeprefix(f"{out_dir} "), out_dir) from None
    model = _model_of(source, seed)
    if hasattr(source, "ir"):  # checkpoints were checked as they loaded
        from ltmdsl.runtime.checkpoint import warn_nonfinite

        warn_nonfinite(model.named_parameters(), f"model {model.ir.name}")
    cfg, plan = hf_plan(model.ir)
    state = {name: p.detach().cpu() for name, p in model.named_parameters()}
    tensors = to_hf(plan, state, expert_counts(model.ir), fused=fused)
    dtypes = {str(t.dtype).replace("torch.", "") for t in tensors.values()}
    if len(dtypes) == 1:
        cfg["torch_dtype"] = dtypes.pop()
    with atomic.directory(out_dir) as tmp:
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
