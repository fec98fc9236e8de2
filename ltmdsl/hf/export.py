"""Runtime model -> Hugging Face folder (`config.json` + `model.safetensors`) that transformers loads.

    ltmdsl.hf.export_hf(model, "out/")                 # a runtime model (ltmdsl.build / from_hf)
    ltmdsl.hf.export_hf("model.ltm", "out/", seed=0)   # a spec: the weights its `build(seed=...)` draws

`config_from_ir` picks the one family whose layout the resolved model has (Llama, Mistral, Qwen2, Qwen3,
Mixtral, Mamba, Mamba-2, Jamba, Nemotron-H (with MoE), Bamba, Qwen3-Next, LFM2,
RecurrentGemma, DeepSeek-V2 / V3: `LAYOUTS`) and writes its model-level fields; each
sub-layer's kind writes its own fields through its HF facet (ltmdsl/kinds/<kind>_hf.py). To be sure nothing
is lost, the config is imported again (configs.py) and must resolve to exactly the same sub-layers, norms and
sizes; models with no exact Hugging Face counterpart (shared blocks, mixed attention shapes, layernorm, ...)
are an `HFError` that says why and names the sub-layers the closest family has no place for (`misfits`); a
kind without an HF facet is named as such. The folder appears atomically: it is written under a temporary
name next to the destination and renamed into place, so an error leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable

from ltmdsl import atomic
from ltmdsl.tensorfile import TensorFileError, check_fits
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import plan_from_config
from ltmdsl.hf.families import (deepseek_v2, deepseek_v3, falcon_h1, gemma3, gpt_oss, granitemoehybrid, kimi_linear,
                                llama4, minimax, qwen3_5, qwen3_moe)
from ltmdsl.hf.spec import Plan
from ltmdsl.hf.weights import buffers_of, expert_counts, layer_configs, to_hf
from ltmdsl.ir import ModelIR
from ltmdsl.kinds.hf import hf_facet

_TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mamba": "MambaForCausalLM",
         "mamba2": "Mamba2ForCausalLM", "jamba": "JambaForCausalLM", "nemotron_h": "NemotronHForCausalLM",
         "bamba": "BambaForCausalLM", "qwen3_next": "Qwen3NextForCausalLM", "lfm2": "Lfm2ForCausalLM",
         "recurrent_gemma": "RecurrentGemmaForCausalLM", "xlstm": "xLSTMForCausalLM",
         "deepseek_v2": deepseek_v2.ARCH, "deepseek_v3": deepseek_v3.ARCH,
         **dict(qwen3_5.ARCHITECTURES.values()), "kimi_linear": kimi_linear.ARCH, "qwen3_moe": qwen3_moe.ARCH,
         "gpt_oss": gpt_oss.ARCH, "gemma3_text": gemma3.ARCH, "llama4_text": llama4.ARCH,
         "granitemoehybrid": granitemoehybrid.ARCH, minimax.MODEL_TYPE: minimax.ARCH,
         "falcon_h1": falcon_h1.ARCH}


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


# ---------------------------------------------------------------------------------------------------------
# The families' layouts: which kinds each slot of the stack may hold, and why another has no place there.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One family's stack: mixer + FFN pairs (`paired`, kinds per slot) or layers in any order (`ffns` then
    lists every kind it has). `family` is the model_type whose naming the kinds' `misfit` and `write` use;
    `not_mixer` / `not_ffn` say why a kind outside the slot has no place there (`{kind}` is filled in)."""

    description: str
    family: str
    paired: bool
    mixers: tuple[str, ...]
    ffns: tuple[str, ...]
    not_mixer: str
    not_ffn: str
    own: Callable[[object], str | None] | None = None  # a family module's own `misfit` (hf/families/<type>.py)

    def holds(self, ir: ModelIR) -> bool:
        """Whether every sub-layer's kind has a slot here (the kinds' own settings are not checked)."""
        if not self.paired:
            return all(layer.kind in self.ffns for layer in ir.layers)
        return _paired(ir) and all(layer.kind in (self.ffns if i % 2 else self.mixers)
                                   for i, layer in enumerate(ir.layers))

    def misfit(self, c, kinds: tuple[str, ...], otherwise: str) -> str | None:
        if c.kind not in kinds:
            return otherwise.format(kind=c.kind)
        return self.own(c) if self.own is not None else hf_facet(c.kind).misfit(c, self.family)


_SWIGLU_FFN = "expected the MLP or MoE that follows each mixer"
LAYOUTS = {
    "llama": Layout("Llama / Mistral / Mixtral / Qwen (RoPE attention, each followed by a SwiGLU MLP or MoE)",
                    "llama", True, ("attention",), ("mlp", "moe"), "Llama-style families have attention mixers only",
                    _SWIGLU_FFN),
    "jamba": Layout("Jamba (Mamba-1 with inner norms or attention without RoPE, each followed by a SwiGLU MLP or "
                    "MoE)", "jamba", True, ("mamba", "attention"), ("mlp", "moe"),
                    "Jamba's SSM layers are Mamba-1 (mamba)", _SWIGLU_FFN),
    "bamba": Layout("Bamba (Mamba-2 or RoPE attention, each followed by a SwiGLU MLP)", "bamba", True,
                    ("mamba2", "attention"), ("mlp",), "Bamba's SSM layers are Mamba-2 (mamba2)",
                    "expected the MLP that follows each mixer"),
    "nemotron_h": Layout("Nemotron-H (Mamba-2, attention without RoPE, relu2 MLPs and relu2 MoEs in any order)",
                         "nemotron_h", False, (), ("mamba2", "attention", "mlp", "moe"), "",
                         "Nemotron-H has no {kind} layers (Mamba-2, attention, relu2 MLPs and MoEs only)"),
    "lfm2": Layout("LFM2 (short convolutions or RoPE attention with qk_norm, each followed by a SwiGLU MLP)", "lfm2",
                   True, ("short_conv", "attention"), ("mlp",), "LFM2's mixers are short convolutions and attention",
                   "expected the MLP that follows each mixer"),
    "recurrent_gemma": Layout("RecurrentGemma (RG-LRU or local attention with half-head RoPE, each followed by a "
                              "GeGLU MLP with biases; zero-centred norms)", "recurrent_gemma", True,
                              ("rg_lru", "attention"), ("mlp",), "RecurrentGemma's mixers are RG-LRU blocks and "
                              "local attention", "expected the MLP that follows each mixer"),
    "xlstm": Layout("xLSTM (mLSTM layers, each followed by a SwiGLU MLP; soft-capped logits)", "xlstm", True,
                    ("mlstm",), ("mlp",), "xLSTM's mixers are mLSTM layers", "expected the MLP that follows each mixer"),
    "mamba": Layout("Mamba (Mamba-1 layers only)", "mamba", False, (), ("mamba",), "",
                    "Mamba has Mamba-1 layers only (without inner norms)"),
    "mamba2": Layout("Mamba-2 (Mamba-2 layers only)", "mamba2", False, (), ("mamba2",), "",
                     "Mamba-2 has Mamba-2 layers only"),
    "qwen3_next": Layout("Qwen3-Next (Gated DeltaNet or gated attention, each followed by a SwiGLU MLP or MoE with a "
                         "gated shared expert; zero-centred norms)", "qwen3_next", True,
                         ("gated_deltanet", "attention"), ("mlp", "moe"),
                         "Qwen3-Next's mixers are Gated DeltaNet and gated attention", _SWIGLU_FFN),
    **{f.FAMILY: Layout(f"{name} (multi-head latent attention, each followed by a SwiGLU MLP on the first "
                        f"first_k_dense_replace layers and {moe} MoE with shared experts after)", f.FAMILY, True,
                        ("mla",), ("mlp", "moe"), "DeepSeek's mixers are multi-head latent attention (mla)",
                        _SWIGLU_FFN)
       for f, name, moe in ((deepseek_v2, "DeepSeek-V2", "a softmax-routed"),
                            (deepseek_v3, "DeepSeek-V3", "a sigmoid-routed, bias-corrected"))},
    **{f: Layout(f"{name}, with --family {f} (Gated DeltaNet or gated attention, each followed by a {ffn}; "
                 "zero-centred norms)", f, True, ("gated_deltanet", "attention"), (kind,),
                 "Qwen3.5's mixers are Gated DeltaNet and gated attention", f"expected the {kind} after each mixer")
       for f, name, kind, ffn in (("qwen3_5", "Qwen3.5", "mlp", "SwiGLU MLP"),
                                  ("qwen3_5_moe", "Qwen3.5-MoE", "moe", "MoE with a gated shared expert"))},
    "kimi_linear": Layout("Kimi-Linear (KDA or MLA without RoPE, each followed by a SwiGLU MLP or a MoE with "
                          "DeepSeek-V3's router and shared experts)", "kimi_linear", True, ("kda", "mla"), ("mlp", "moe"),
                          "Kimi-Linear's mixers are KDA and MLA without RoPE", _SWIGLU_FFN),
    "qwen3_moe": Layout(**qwen3_moe.LAYOUT),
    "gpt_oss": Layout(**gpt_oss.LAYOUT),
    "gemma3_text": Layout(**gemma3.LAYOUT),
    "llama4_text": Layout(**llama4.LAYOUT),
    "granitemoehybrid": Layout(**granitemoehybrid.LAYOUT),
    minimax.MODEL_TYPE: Layout(**minimax.LAYOUT),
    "falcon_h1": Layout(**falcon_h1.LAYOUT),
}


def _paired(ir: ModelIR) -> bool:
    """Mixer + FFN pairs, the shape of every family whose HF layer holds both."""
    layers, n = ir.layers, len(ir.layers)
    return n % 2 == 0 and all(not layers[i].is_ffn and layers[i + 1].is_ffn for i in range(0, n, 2))


def _traits(configs) -> set[str]:
    """The union of the configs' HF traits (what the family choice selects on)."""
    return set().union(*(hf_facet(c.kind).traits(c) for c in configs))


def _write(c, family: str, d: int) -> dict:
    return hf_facet(c.kind).write(c, family, d)


def _groups(configs) -> dict[str, list]:
    """Configs by kind, in order of first appearance."""
    out: dict[str, list] = {}
    for c in configs:
        out.setdefault(c.kind, []).append(c)
    return out


def _kind_fields(configs, family: str, d: int) -> dict:
    """Each kind's fields, from the one setting its layers share (a config holds one per kind)."""
    out = {}
    for kind, group in _groups(configs).items():
        out.update(_write(_one(group, f"{hf_facet(kind).label} settings"), family, d))
    return out


def _at(configs, kinds: tuple[str, ...]) -> list[bool]:
    return [c.kind in kinds for c in configs]


def config_from_ir(ir: ModelIR, family: str | None = None) -> dict:
    """The Hugging Face config.json dict of a resolved model (see the module docstring).

    `family` picks the model_type where several hold the same computation (a Qwen3-Next-shaped stack is also
    Qwen3.5's: `qwen3_5` / `qwen3_5_moe`); an HFError when the model is not that family's.

    A refusal names the sub-layers (index, definition name, kind) that the closest supported family has no
    place for, and why (`misfits`); where every sub-layer has a place, the reason is one the layers share
    (they differ in a setting one config holds once, ...). A kind without an HF facet, or one that declares
    no Hugging Face counterpart, is named first.
    """
    for layer in ir.layers:
        try:
            hf_facet(layer.kind)
        except HFError as e:
            raise HFError(f"layer {layer.index} '{layer.definition}': {e.message}") from None
    if family is not None and family not in _FAMILY_CHOICES:
        raise HFError(f"--family {family!r} is not a family to choose (choices: {', '.join(_FAMILY_CHOICES)})")
    try:
        cfg = _family_config(ir, family)
    except HFError as e:
        if e.message.startswith(_NO_COUNTERPART):
            raise
        detail = misfits(ir)
        raise HFError(f"{e.message}. {detail}" if detail else e.message, e.path) from None
    chosen = qwen3_5.MODEL_TYPES.get(cfg["model_type"], (cfg["model_type"],))[0]
    if family is not None and chosen != family:
        raise HFError(f"this model maps to {cfg['model_type']}, not to {family}")
    return cfg


#: The families `config_from_ir(family=...)` may be asked for, beside the one it would pick.
_FAMILY_CHOICES = ("qwen3_next", "qwen3_5", "qwen3_5_moe")

_NO_COUNTERPART = "this stack has no Hugging Face counterpart"


def _family_config(ir: ModelIR, family: str | None = None) -> dict:
    """config_from_ir without the per-layer explanation of a refusal."""
    layers = ir.layers
    if ir.mtp is not None:  # only DeepSeek-V3's checkpoints hold them (beside what transformers builds)
        cfg = _family_config(dataclasses.replace(ir, mtp=None), family)
        if cfg["model_type"] != deepseek_v3.FAMILY:
            raise HFError(f"multi-token-prediction modules (mtp) map only to DeepSeek-V3 checkpoints "
                          f"(num_nextn_predict_layers); {cfg['model_type']} has none: drop the model's mtp setting "
                          "to export the main model")
        return {**cfg, "num_nextn_predict_layers": ir.mtp.depth}  # the block: checked by hf_plan's round trip
    if any(layer.tie_group is not None for layer in layers):
        raise HFError("shared (weight-tied) blocks have no Hugging Face counterpart among the supported families")
    norm = _one([layer.norm for layer in layers] + [ir.final_norm], "norm")
    if norm.kind != "rmsnorm":
        raise HFError(f"{norm.kind} has no Hugging Face counterpart among the supported families (all use rmsnorm)")
    base = {"vocab_size": ir.vocab, "hidden_size": ir.d_model, "tie_word_embeddings": ir.tie_embeddings,
            "torch_dtype": _TORCH_DTYPE.get(ir.dtype.name, "bfloat16")}
    if gemma3.fits(ir):
        return gemma3.config(ir, base, norm.eps)
    if any(layer.kind == "lightning" or layer.residual.skip == "normed" for layer in layers):
        return minimax.config(ir, base, norm.eps)
    gdn = any(layer.kind == "gated_deltanet" for layer in layers)
    griffin = ir.logit_cap is not None or any(layer.kind == "rg_lru" for layer in layers)
    if norm.zero_centred and not gdn and griffin and LAYOUTS["recurrent_gemma"].holds(ir):
        return _recurrent_gemma_config(ir, base, norm.eps)  # the zero-centred family of RG-LRU and soft caps
    if norm.zero_centred or gdn:
        if not norm.zero_centred or not LAYOUTS["qwen3_next"].holds(ir):
            raise HFError("zero-centred norms and Gated DeltaNet map back only to Qwen3-Next (zero-centred rmsnorm, "
                          "Gated DeltaNet or gated attention, each followed by a SwiGLU MLP or MoE; or Qwen3.5 with "
                          "--family qwen3_5 / qwen3_5_moe) or RecurrentGemma "
                          "(zero-centred rmsnorm, RG-LRU or local attention, each followed by a GeGLU MLP, and a "
                          "logit_cap)")
        if family in ("qwen3_5", "qwen3_5_moe") and LAYOUTS[family].holds(ir):
            return qwen3_5.config(ir, base, norm.eps)
        return _qwen3_next_config(ir, norm.eps)
    mixers = [layer.mixer for layer in layers]
    n, d = len(layers), ir.d_model
    if LAYOUTS["kimi_linear"].holds(ir) and (any(layer.kind == "kda" for layer in layers) or all(
            m.rope_theta is None for m in mixers if m.kind == "mla")):  # KDA, or MLA without RoPE
        return kimi_linear.config(ir, base, norm.eps)
    if any(layer.kind == "mla" for layer in layers) and LAYOUTS["deepseek_v2"].holds(ir):
        return (deepseek_v3 if deepseek_v3.claims(ir) else deepseek_v2).config(ir, base, norm.eps)
    if granitemoehybrid.fits(ir):
        return granitemoehybrid.config(ir, base, norm.eps)
    if falcon_h1.fits(ir):
        return falcon_h1.config(ir, base, norm.eps)
    if any(layer.kind == "mlstm" for layer in layers) and LAYOUTS["xlstm"].holds(ir):
        return _xlstm_config(ir, base, norm.eps)

    for family in ("mamba", "mamba2"):  # one SSM kind, no FFN
        if LAYOUTS[family].holds(ir):
            return {**base, "model_type": family, "num_hidden_layers": n, "layer_norm_epsilon": norm.eps,
                    **_kind_fields(mixers, family, d)}
    paired = _paired(ir)
    heads, ffns = (_traits(mixers[0::2]), _traits(mixers[1::2])) if paired else (set(), set())
    bamba = LAYOUTS["bamba"].holds(ir) and all("swiglu" in _traits([f]) for f in mixers[1::2]) and \
        "no_rope" not in heads
    if "partial_rope" in _traits(mixers):
        if bamba:  # the one supported family whose transformers code applies partial rotary embeddings
            return _bamba_config(ir, base, norm.eps)
        raise HFError("attention with rope_dim (partial rotary embeddings) maps back only to Bamba (Mamba-2 or "
                      "RoPE attention, each followed by a SwiGLU MLP); transformers' Llama-style families rotate "
                      "the whole head")
    if gpt_oss.fits(ir):
        return gpt_oss.config(ir, base, norm.eps)
    if llama4.fits(ir):
        return llama4.config(ir, base, norm.eps)
    if qwen3_moe.fits(ir):
        return qwen3_moe.config(ir, base, norm.eps)
    if LAYOUTS["llama"].holds(ir) and "no_rope" not in heads:
        return _transformer_config(ir, base, norm.eps)
    if LAYOUTS["jamba"].holds(ir) and "rope" not in heads:
        return _jamba_config(ir, base, norm.eps)
    if bamba:
        return _bamba_config(ir, base, norm.eps)
    if LAYOUTS["nemotron_h"].holds(ir):
        return _nemotron_config(ir, base, norm.eps)
    if LAYOUTS["lfm2"].holds(ir):  # after Llama/Qwen3: attention-only LFM2 stacks are Qwen3's
        return _lfm2_config(ir, base, norm.eps)
    descriptions = "; ".join(layout.description for layout in LAYOUTS.values())
    raise HFError(f"{_NO_COUNTERPART}. {misfits(ir) or 'Supported families: ' + descriptions + '.'}")


# ---------------------------------------------------------------------------------------------------------
# Why a stack has no counterpart: the layers the closest supported family has no place for.
# ---------------------------------------------------------------------------------------------------------


def _family_misfits(ir: ModelIR, layout: Layout) -> list[str]:
    """`layer i 'definition' (kind): why` for each sub-layer the family has no place for."""
    out = []
    n = len(ir.layers)
    for layer in ir.layers:
        m = layer.mixer
        if not layout.paired:
            why = layout.misfit(m, layout.ffns, layout.not_ffn)
        elif layer.index % 2 == 0:
            why = ("expected a mixer (attention or an SSM) at an even position" if layer.is_ffn
                   else "a mixer without the FFN that must follow it" if layer.index == n - 1
                   else layout.misfit(m, layout.mixers, layout.not_mixer))
        else:
            why = f"expected the FFN after the mixer, got {m.kind}" if not layer.is_ffn \
                else layout.misfit(m, layout.ffns, layout.not_ffn)
        if why:
            out.append(f"layer {layer.index} '{layer.definition}' ({m.kind}): {why}")
    return out


def misfits(ir: ModelIR, shown: int = 6) -> str:
    """The closest supported family and the layers (index, definition name, kind) it has no place for, and why;
    "" when the closest family has a place for every layer."""
    ranked = sorted(((len(bad), i, layout.description, bad) for i, layout in enumerate(LAYOUTS.values())
                     for bad in [_family_misfits(ir, layout)]))
    _, _, name, bad = ranked[0]
    if not bad:
        return ""
    listed = "; ".join(bad[:shown]) + (f"; and {len(bad) - shown} more" if len(bad) > shown else "")
    return (f"The closest supported family is {name}, which has no place for {len(bad)} of its {len(ir.layers)} "
            f"sub-layers: {listed}. Supported families: "
            + "; ".join(layout.description for layout in LAYOUTS.values()) + ".")


# ---------------------------------------------------------------------------------------------------------
# One writer per family: the model-level fields and the layout; each kind writes its own fields.
# ---------------------------------------------------------------------------------------------------------


def _attention_shape(a, d: int) -> tuple:
    """What Llama-style layers must share (everything but the window), from the attention facet's fields."""
    fields = {k: v for k, v in _write(a, "qwen3", d).items() if k != "sliding_window"}
    return json.dumps(fields, sort_keys=True), frozenset(hf_facet(a.kind).traits(a) - {"window"})


def _transformer_config(ir: ModelIR, base: dict, eps: float) -> dict:
    attn_layers = [layer.mixer for layer in ir.layers[0::2]]
    ffns = [layer.mixer for layer in ir.layers[1::2]]
    d = ir.d_model
    _one([_attention_shape(a, d) for a in attn_layers], "attention shape")
    attn = attn_layers[0]
    windows = [_write(a, "mistral", d)["sliding_window"] for a in attn_layers]
    out = {**base, "num_hidden_layers": len(attn_layers), "rms_norm_eps": eps, "hidden_act": "silu"}
    ffn = _one(ffns, "feed-forward settings")
    a, f = _traits([attn]), _traits([ffn])
    if "experts" in f:
        ffn_fields = _write(ffn, "mixtral", d)
        return {**out, **_write(attn, "mixtral", d), **ffn_fields, "model_type": "mixtral",
                "sliding_window": _one(windows, "attention window")}
    ffn_fields = _write(ffn, "llama", d)  # refuses any activation but swiglu
    if "qk_norm" in a or ("qkv_bias" in a and "out_bias" not in a):
        if "bias" in f or ("qk_norm" in a and ("qkv_bias" in a) != ("out_bias" in a)):
            raise HFError("Qwen2/Qwen3 have no MLP bias, and Qwen3's attention_bias covers q, k, v and o alike")
        w = [x for x in windows if x is not None]
        if len(set(w)) > 1:
            raise HFError("Qwen sliding layers share one window size")
        family = "qwen3" if "qk_norm" in a else "qwen2"
        return {**out, **_write(attn, family, d), **_write(ffn, family, d), "model_type": family,
                "use_sliding_window": bool(w), "sliding_window": w[0] if w else None,
                "max_window_layers": len(windows),
                "layer_types": ["sliding_attention" if x is not None else "full_attention" for x in windows]}
    if ("qkv_bias" in a) != ("out_bias" in a):
        raise HFError("Llama's attention_bias covers q, k, v and o alike")
    if len(set(windows)) > 1:
        raise HFError("layers with different attention windows map back only to Qwen2/Qwen3 (with their biases)")
    if windows[0] is not None:
        if "qkv_bias" in a or "bias" in f:
            raise HFError("Mistral (sliding window) has no attention or MLP biases")
        return {**out, **_write(attn, "mistral", d), **_write(ffn, "mistral", d), "model_type": "mistral"}
    return {**out, **_write(attn, "llama", d), **ffn_fields, "model_type": "llama"}


def _jamba_config(ir: ModelIR, base: dict, eps: float) -> dict:
    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffns = [layer.mixer for layer in ir.layers[1::2]]
    d = ir.d_model
    out = {**base, "model_type": "jamba", "num_hidden_layers": len(mixers), "rms_norm_eps": eps, "hidden_act": "silu",
           **_kind_fields(mixers, "jamba", d)}
    ffn_fields = [_write(f, "jamba", d) for f in ffns]
    out["intermediate_size"] = _one([x["intermediate_size"] for x in ffn_fields],
                                    "d_ff (Jamba has one intermediate_size)")
    moe_at = ["experts" in _traits([f]) for f in ffns]
    moes = [json.dumps(x, sort_keys=True) for x, e in zip(ffn_fields, moe_at) if e]
    out.update(json.loads(_one(moes, "MoE settings")) if moes else {"num_experts": 1, "num_experts_per_tok": 1})
    a_period, e_period = _period(_at(mixers, ("attention",))), _period(moe_at)
    if a_period is None or e_period is None:
        raise HFError("Jamba places attention and MoE layers by period and offset; this stack has no such period")
    out.update(attn_layer_period=a_period[0], attn_layer_offset=a_period[1],
               expert_layer_period=e_period[0], expert_layer_offset=e_period[1])
    return out


#: Nemotron-H's pattern character of each kind it has.
_NEMOTRON_SYMBOL = {"mamba2": "M", "attention": "*", "mlp": "-", "moe": "E"}


def _nemotron_config(ir: ModelIR, base: dict, eps: float) -> dict:
    return {**base, "model_type": "nemotron_h", "layer_norm_epsilon": eps,
            "hybrid_override_pattern": "".join(_NEMOTRON_SYMBOL[layer.kind] for layer in ir.layers),
            "num_hidden_layers": len(ir.layers),
            **_kind_fields([layer.mixer for layer in ir.layers], "nemotron_h", ir.d_model)}


def _bamba_config(ir: ModelIR, base: dict, eps: float) -> dict:
    """Bamba: attention (with RoPE, partial or whole-head) at `attn_layer_indices`, Mamba-2 elsewhere, a SwiGLU
    MLP after each. The attention facet writes rope_dim as rope_parameters.partial_rotary_factor."""
    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffn = _one([layer.mixer for layer in ir.layers[1::2]], "MLP settings (Bamba has one intermediate_size)")
    return {**base, "model_type": "bamba", "num_hidden_layers": len(mixers), "rms_norm_eps": eps,
            "hidden_act": "silu", **_write(ffn, "bamba", ir.d_model),
            "attn_layer_indices": [i for i, at in enumerate(_at(mixers, ("attention",))) if at],
            **_kind_fields(mixers, "bamba", ir.d_model)}


def _qwen3_next_config(ir: ModelIR, eps: float) -> dict:
    """Qwen3-Next: `layer_types` names each mixer; MoE blocks everywhere but `mlp_only_layers` (a dense SwiGLU
    MLP there), with decoder_sparse_step 1; num_experts 0 when there are no expert layers."""
    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffns = [layer.mixer for layer in ir.layers[1::2]]
    d = ir.d_model
    moe_at = _at(ffns, ("moe",))
    out = {"vocab_size": ir.vocab, "hidden_size": d, "tie_word_embeddings": ir.tie_embeddings,
           "torch_dtype": _TORCH_DTYPE.get(ir.dtype.name, "bfloat16"), "model_type": "qwen3_next",
           "num_hidden_layers": len(mixers), "rms_norm_eps": eps, "hidden_act": "silu",
           "layer_types": ["full_attention" if m.kind == "attention" else "linear_attention" for m in mixers],
           "decoder_sparse_step": 1, "mlp_only_layers": [i for i, e in enumerate(moe_at) if not e],
           **_kind_fields(mixers, "qwen3_next", d), **_kind_fields(ffns, "qwen3_next", d)}
    if not any(moe_at):
        out["num_experts"] = 0
    return out


def _recurrent_gemma_config(ir: ModelIR, base: dict, eps: float) -> dict:
    """RecurrentGemma: `block_types` is the shortest unit whose repeats give the mixers (recurrent or attention);
    one GeGLU MLP setting; the soft cap written as logits_soft_cap (the embedding scale and the zero-centred
    norms are the family's own: the round trip checks them)."""
    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffn = _one([layer.mixer for layer in ir.layers[1::2]], "MLP settings (RecurrentGemma has one intermediate_size)")
    if ir.logit_cap is None:
        raise HFError("RecurrentGemma soft-caps its logits (logits_soft_cap); this model has no logit_cap")
    types = ["attention" if m.kind == "attention" else "recurrent" for m in mixers]
    period = next(p for p in range(1, len(types) + 1) if all(t == types[i % p] for i, t in enumerate(types)))
    out = {**base, "model_type": "recurrent_gemma", "num_hidden_layers": len(mixers), "rms_norm_eps": eps,
           "logits_soft_cap": ir.logit_cap, "block_types": types[:period], **_write(ffn, "recurrent_gemma", ir.d_model),
           "hidden_activation": "gelu_pytorch_tanh" if ffn.activation == "geglu_tanh" else "gelu",
           **_kind_fields(mixers, "recurrent_gemma", ir.d_model)}
    return out


def _xlstm_config(ir: ModelIR, base: dict, eps: float) -> dict:
    """xLSTM: one mLSTM and one MLP setting for every block; norm_eps is both the block norms' and the mLSTM's
    per-head LayerNorm's; output_logit_soft_cap null when the model has no logit_cap."""
    cell = _one([layer.mixer for layer in ir.layers[0::2]], "mLSTM settings (xLSTM has one of each)")
    ffn = _one([layer.mixer for layer in ir.layers[1::2]], "MLP settings (xLSTM has one ffn_proj_factor)")
    if cell.norm_eps != eps:
        raise HFError(f"xLSTM has one norm_eps for its block norms and the mLSTM's per-head norm; this model has "
                      f"{eps} and {cell.norm_eps}")
    return {**base, "model_type": "xlstm", "num_hidden_layers": len(ir.layers) // 2,
            "output_logit_soft_cap": ir.logit_cap, "add_out_norm": True, "weight_mode": "single",
            **_write(ffn, "xlstm", ir.d_model), **_write(cell, "xlstm", ir.d_model)}


def _lfm2_config(ir: ModelIR, base: dict, eps: float) -> dict:
    """LFM2: `layer_types` says conv or full_attention per HF layer, a SwiGLU MLP after each (its width written
    as is: block_auto_adjust_ff_dim false)."""
    mixers = [layer.mixer for layer in ir.layers[0::2]]
    ffn = _one([layer.mixer for layer in ir.layers[1::2]], "MLP settings (LFM2 has one intermediate_size)")
    return {**base, "model_type": "lfm2", "num_hidden_layers": len(mixers), "norm_eps": eps,
            **_write(ffn, "lfm2", ir.d_model), **_kind_fields(mixers, "lfm2", ir.d_model),
            "layer_types": ["full_attention" if m.kind == "attention" else "conv" for m in mixers]}


def _same_model(a: ModelIR, b: ModelIR) -> str | None:
    """Why two resolved models differ in anything that matters for weights and outputs; None if they agree."""
    for what in ("vocab", "d_model", "tie_embeddings", "final_norm", "embed_scale", "residual_scale", "logit_scale",
                 "logit_cap"):
        if getattr(a, what) != getattr(b, what):
            return f"{what} {getattr(a, what)} != {getattr(b, what)}"
    if len(a.layers) != len(b.layers):
        return f"{len(a.layers)} sub-layers != {len(b.layers)}"
    if (a.mtp is None) != (b.mtp is None) or a.mtp is not None and (
            a.mtp.depth != b.mtp.depth or [(x.norm, x.mixer) for x in a.mtp.block] !=
            [(x.norm, x.mixer) for x in b.mtp.block]):
        return "its multi-token-prediction modules (mtp) differ from what the config's layers give"
    for x, y in zip(a.layers, b.layers):
        if x.residual != y.residual:
            return f"sub-layer {x.index}: residual {x.residual} != {y.residual} (the family has no such residual)"
        if (x.norm, x.mixer, x.post_norm) != (y.norm, y.mixer, y.post_norm):
            return f"sub-layer {x.index}: {x.mixer} != {y.mixer}"
    return None


def hf_plan(ir: ModelIR, family: str | None = None) -> tuple[dict, Plan]:
    """The config dict and its import plan (of `family`, see `config_from_ir`), checked to resolve back to
    exactly `ir`."""
    import ltmdsl

    cfg = {"architectures": None, **config_from_ir(ir, family)}
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


def export_hf(source, out_dir, *, fused: bool = False, seed: int = 0, overwrite: bool = False,
              family: str | None = None) -> str:
    """Write `source` (see `_model_of`) as a Hugging Face folder at `out_dir`; returns the folder's path.

    Experts are written per expert as published checkpoints are, or in transformers 5's fused layout
    with `fused=True`. An existing non-empty `out_dir` is replaced only with `overwrite=True`. `family`
    picks the model_type where several fit (see `config_from_ir`).
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
    cfg, plan = hf_plan(model.ir, family)
    from ltmdsl.runtime.checkpoint import stored_tensors

    state = {name: p.detach().cpu() for name, p in stored_tensors(model).items()}  # with the persistent buffers
    tensors = to_hf(plan, state, expert_counts(model.ir), fused=fused, layers=layer_configs(model.ir))
    dtypes = {str(t.dtype).replace("torch.", "") for t in tensors.values()}
    computed = buffers_of(plan, model.ir)  # transformers saves them with the weights, in the weights' dtype
    tensors.update({name: t.to(next(iter(tensors.values())).dtype) for name, t in computed.items()})
    if len(dtypes) == 1:
        cfg["torch_dtype"] = dtypes.pop()
    with atomic.directory(out_dir) as tmp:
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
