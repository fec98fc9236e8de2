"""MiniMax (model_type minimax; MiniMax-Text-01), as transformers' MiniMaxForCausalLM.

Every HF layer is a sequence mixer, lightning attention (`linear_attention`) or GQA softmax attention with RoPE
over the whole head (`full_attention`), as `layer_types` names them (MiniMaxConfig's default: full attention on
the even 0-based layers, lightning on the odd ones), then the sparse MoE block (Mixtral's: softmax router
`block_sparse_moe.gate`, the top `num_experts_per_tok` of `num_local_experts` SwiGLU experts of
`intermediate_size`, renormalised). Both sub-layers take their residual after their RMSNorm and scale it
(MiniMaxDecoderLayer):

    h = input_layernorm(x);          x = h * attn_alpha + self_attn(h) * attn_beta
    h = post_attention_layernorm(x); x = h * mlp_alpha + mlp(h) * mlp_beta

with attn_alpha / attn_beta the `linear_attn_*_factor`s on lightning layers and the `full_attn_*_factor`s on
softmax layers, and `mlp_alpha_factor` / `mlp_beta_factor` on every MoE: in the language, each sub-layer's
`skip = normed, skip_scale = alpha, branch_scale = beta` (ltmdsl.ir.Residual).

Keys of MiniMax-Text-01's original (remote-code) config that transformers ignores are accepted only where they
agree with what transformers computes, and refused by name otherwise: `attn_type_list` (1 = softmax, 0 =
lightning) must match `layer_types` (alone it is refused: transformers would alternate the layers instead),
`postnorm` must be true, the `layernorm_*_alpha` / `layernorm_*_beta` copies must equal the factors,
`shared_intermediate_size` must be 0 (then `shared_moe_mode` is moot), and `rotary_dim` must be the whole head
(the attention facet: transformers' MiniMaxAttention rotates every channel).
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num, show_value
from ltmdsl.kinds.hf import hf_facet

MODEL_TYPE = "minimax"
ARCH = "MiniMaxForCausalLM"
#: export's Layout fields (ltmdsl.hf.export.Layout)
LAYOUT = dict(description="MiniMax (lightning attention or RoPE attention, each followed by a SwiGLU MoE; residuals "
                          "taken after the norms and scaled)", family="minimax", paired=True,
              mixers=("lightning", "attention"), ffns=("moe",),
              not_mixer="MiniMax's mixers are lightning attention and softmax attention",
              not_ffn="expected the MoE that follows each mixer")

#: layer type -> (kind, definition name, legend symbol, alpha key, beta key)
MIXERS = {"linear_attention": ("lightning", "lin", "L", "linear_attn_alpha_factor", "linear_attn_beta_factor"),
          "full_attention": ("attention", "attn", "A", "full_attn_alpha_factor", "full_attn_beta_factor")}
MLP_FACTORS = ("mlp_alpha_factor", "mlp_beta_factor")
#: MiniMax-Text-01's original names of the six factors
ORIGINAL_FACTORS = {"linear_attn_alpha_factor": "layernorm_linear_attention_alpha",
                    "linear_attn_beta_factor": "layernorm_linear_attention_beta",
                    "full_attn_alpha_factor": "layernorm_full_attention_alpha",
                    "full_attn_beta_factor": "layernorm_full_attention_beta",
                    "mlp_alpha_factor": "layernorm_mlp_alpha", "mlp_beta_factor": "layernorm_mlp_beta"}


def layer_types(r: Reader, layers: int) -> list[str]:
    """Each layer's mixer type from `layer_types` (MiniMaxConfig's default alternates, full attention first),
    checked against the original config's `attn_type_list` when that is stated too."""
    types = r.raw("layer_types", None)
    listed = r.raw("attn_type_list", None)
    if types is None:
        if listed is not None:
            raise r.fail("'attn_type_list' without 'layer_types': transformers' MiniMaxConfig ignores it and "
                         "alternates full and linear attention; state the layers in 'layer_types'")
        return ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(not isinstance(t, str) or t not in MIXERS
                                                                 for t in types):
        raise r.fail(f"'layer_types' must list num_hidden_layers = {layers} of 'linear_attention' / "
                     f"'full_attention', got {show_value(types)}")
    if listed is not None and listed != [int(t == "full_attention") for t in types]:
        raise r.fail("'attn_type_list' (1 = softmax attention, 0 = lightning) disagrees with 'layer_types'")
    return types


def factors(r: Reader) -> dict[str, float]:
    """The six residual factors (MiniMaxConfig's default 1 each), with the original config's copies checked."""
    out = {}
    for key, original in ORIGINAL_FACTORS.items():
        out[key] = r.float(key, 1.0)
        if r.present(original) and r.float(original) != out[key]:
            raise r.fail(f"'{original}' = {show_value(r.raw(original))} disagrees with '{key}' = {out[key]:g} "
                         "(transformers reads only the latter)")
        r.raw(original, None)
    return out


def residual(call: str, alpha: float, beta: float) -> str:
    """A layer call with MiniMax's residual: taken after the norm, scaled by alpha, the branch by beta."""
    extra = ", skip = normed"
    extra += f", skip_scale = {num(alpha)}" if alpha != 1 else ""
    extra += f", branch_scale = {num(beta)}" if beta != 1 else ""
    return call[:-1] + extra + ")"


def read(r: Reader) -> dict:
    """The plan fields of a MiniMax config (configs.plan_from_config)."""
    vocab = r.int("vocab_size", 32000)
    d = r.int("hidden_size", 4096)
    layers = r.layers("num_hidden_layers", 32)
    eps = r.eps("rms_norm_eps", 1e-5)
    tied = r.bool("tie_word_embeddings", False)
    r.act()  # the lightning layers' qkv activation and the experts' SwiGLU
    types = layer_types(r, layers)
    r.expect("postnorm", lambda v: v in (None, True), "true (transformers' MiniMax always takes the residual after "
             "the norm)")
    r.expect("shared_intermediate_size", lambda v: v in (None, 0), "0 (transformers' MiniMax has no shared expert)")
    r.raw("shared_moe_mode", None)  # how a shared expert would be gated: moot without one
    values = {t: hf_facet(kind).read(r, ReadContext(MODEL_TYPE, d, t in types)) for t, (kind, *_) in MIXERS.items()}
    moe = hf_facet("moe").read(r, ReadContext(MODEL_TYPE, d, True, {"d_ff": r.int("intermediate_size", 14336)}))
    scale = factors(r)
    definitions, legend = {}, {}
    for t, (kind, name, symbol, alpha, beta) in MIXERS.items():
        if t in types:
            definitions[name] = (kind, residual(hf_facet(kind).call(values[t]), scale[alpha], scale[beta]))
            legend[symbol] = name
    definitions["moe"] = ("moe", residual(hf_facet("moe").call(moe), *(scale[k] for k in MLP_FACTORS)))
    legend["E"] = "moe"
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple(MIXERS[t][2] + "E" for t in types), hf=dict(layer_types=types))


def _one(values, what: str):
    distinct = list(dict.fromkeys(values))
    if len(distinct) > 1:
        raise HFError(f"the layers differ in {what}, which one MiniMax config cannot express")
    return distinct[0] if distinct else None


def _merge(out: dict, fields: dict, what: str) -> None:
    """Add `fields` to `out`; a key both hold must agree (lightning and softmax layers share their head keys)."""
    for key, value in fields.items():
        if key in out and out[key] != value:
            raise HFError(f"MiniMax's lightning and softmax layers share '{key}'; this model has {out[key]} and "
                          f"{value} ({what})")
        out[key] = value


def config(ir, base: dict, eps: float) -> dict:
    """The MiniMax config.json fields of a resolved model (export.config_from_ir)."""
    from ltmdsl.hf.export import LAYOUTS

    if not LAYOUTS[MODEL_TYPE].holds(ir):
        raise HFError("lightning attention and residuals taken after the norm map back only to MiniMax "
                      f"({LAYOUT['description']})")
    if ir.final_norm.zero_centred:
        raise HFError("MiniMax's RMSNorms scale by w, not 1 + w (zero_centred)")
    not_normed = [x.index for x in ir.layers if x.residual.skip != "normed"]
    if not_normed:
        raise HFError(f"MiniMax takes every residual after the norm (skip = normed); sub-layers {not_normed[:6]} "
                      "do not")
    d = ir.d_model
    mixers, ffns = ir.layers[0::2], ir.layers[1::2]
    out = {**base, "model_type": MODEL_TYPE, "num_hidden_layers": len(mixers), "rms_norm_eps": eps,
           "hidden_act": "silu", "layer_types": [next(t for t, m in MIXERS.items() if m[0] == x.kind) for x in mixers]}
    for t, (kind, _, _, alpha, beta) in MIXERS.items():
        group = [x for x in mixers if x.kind == kind]
        setting = _one([x.mixer for x in group], f"{kind} settings")
        if setting is not None:
            _merge(out, hf_facet(kind).write(setting, MODEL_TYPE, d), kind)
        r = _one([x.residual for x in group], f"the residual scales of their {kind} layers")
        out[alpha], out[beta] = (r.skip_scale, r.branch_scale) if r is not None else (1.0, 1.0)
    out.update(hf_facet("moe").write(_one([x.mixer for x in ffns], "MoE settings"), MODEL_TYPE, d))
    r = _one([x.residual for x in ffns], "the residual scales of their MoE layers")
    out[MLP_FACTORS[0]], out[MLP_FACTORS[1]] = r.skip_scale, r.branch_scale
    return out
