"""Granite-4.0-H (model_type granitemoehybrid), as transformers' GraniteMoeHybridForCausalLM.

Every HF layer is a mixer, Mamba-2 (`layer_types` "mamba" / "linear_attention", `mamba_*` keys as Bamba's) or
attention ("attention" / "full_attention": no RoPE unless `position_embedding_type` is "rope"; its softmax scale
is `attention_multiplier`), then the FFN: the routed experts (`num_local_experts` SwiGLU experts of
`intermediate_size`, a softmax over the top `num_experts_per_tok` logits) plus the always-present SwiGLU
`shared_mlp` of `shared_intermediate_size`, summed; with num_local_experts 0 the shared_mlp alone. The muP
multipliers are model-level scalars of the language: `embedding_multiplier` (embed_scale), `residual_multiplier`
(residual_scale, on both sub-layers of every layer) and `logits_scaling` (the logits are divided by it:
logit_scale = 1 / logits_scaling). Norms are RMSNorms of `rms_norm_eps`, the Mamba-2 gated norm included.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import show_value
from ltmdsl.kinds.hf import hf_facet

MODEL_TYPE = "granitemoehybrid"
ARCH = "GraniteMoeHybridForCausalLM"
LAYOUT = dict(description="Granite-4.0-H (Mamba-2 or attention with muP scales, each followed by a SwiGLU MoE "
                          "with a shared expert, or by the shared SwiGLU MLP alone)",
              family=MODEL_TYPE, paired=True, mixers=("mamba2", "attention"), ffns=("mlp", "moe"),
              not_mixer="Granite-4.0-H's mixers are Mamba-2 and attention",
              not_ffn="expected the MoE or MLP that follows each mixer")
#: layer_types -> mixer, with the names transformers remaps ("mamba", "attention") to today's.
_MIXERS = {"linear_attention": "M", "mamba": "M", "full_attention": "A", "attention": "A"}
_KINDS = {"M": ("mamba2", "ssm"), "A": ("attention", "attn")}


def _layer(kind: str, r: Reader, d: int, present: bool, **shared) -> dict:
    return hf_facet(kind).read(r, ReadContext(MODEL_TYPE, d, present, shared))


def read(r: Reader) -> dict:
    """The plan fields of a Granite-4.0-H config (configs.plan_from_config)."""
    vocab = r.int("vocab_size", 32000)
    d = r.int("hidden_size", 4096)
    layers = r.layers("num_hidden_layers", 32)
    eps = r.eps("rms_norm_eps", 1e-6)
    tied = r.bool("tie_word_embeddings", False)
    r.act()  # the Mamba-2 layers' and the MLPs' activation alike
    r.expect("normalization_function", lambda v: v in (None, "rmsnorm"), "'rmsnorm'")
    types = r.raw("layer_types", None)
    if types is None:
        types = ["linear_attention"] * layers  # GraniteMoeHybridConfig's default
    if not isinstance(types, list) or len(types) != layers or any(not isinstance(t, str) or t not in _MIXERS
                                                                   for t in types):
        raise r.fail(f"'layer_types' must list num_hidden_layers = {layers} of 'mamba' / 'linear_attention' and "
                     f"'attention' / 'full_attention', got {show_value(types)}")
    mixers = [_MIXERS[t] for t in types]
    experts = r.int("num_local_experts", 8, minimum=0)
    shared = r.int("shared_intermediate_size", 1024)
    values = {s: _layer(kind, r, d, s in mixers) for s, (kind, _) in _KINDS.items()}
    moe = _layer("moe", r, d, experts > 0, experts=experts, shared_d_ff=shared)
    r.raw("intermediate_size", None)  # the experts' width: unused without experts
    mlp = _layer("mlp", r, d, experts == 0, shared_d_ff=shared)
    definitions, legend = {}, {}
    for symbol, (kind, name) in _KINDS.items():
        if symbol in mixers:
            definitions[name], legend[symbol] = (kind, hf_facet(kind).call(values[symbol])), name
    if experts:
        definitions["moe"], legend["E"] = ("moe", hf_facet("moe").call(moe)), "moe"
    else:
        definitions["ffn"], legend["-"] = ("mlp", hf_facet("mlp").call(mlp)), "ffn"
    scales = dict(embed_scale=r.float("embedding_multiplier", 1.0), residual_scale=r.float("residual_multiplier", 1.0),
                  logit_scale=1.0 / r.float("logits_scaling", 1.0))
    return dict(vocab=vocab, d_model=d, norm_eps=eps, tied=tied, definitions=definitions, legend=legend,
                tokens=tuple(m + ("E" if experts else "-") for m in mixers),
                **{k: v for k, v in scales.items() if v != 1.0})


def fits(ir) -> bool:
    """Whether export picks Granite-4.0-H: its pairs, and something only it holds among the families (a muP
    scale, an attention scale, or a MoE with a shared expert after Mamba-2 or attention)."""
    from ltmdsl.hf.export import LAYOUTS

    if not LAYOUTS[MODEL_TYPE].holds(ir):
        return False
    scaled = ir.embed_scale != 1.0 or ir.residual_scale != 1.0 or ir.logit_scale != 1.0
    return scaled or any(x.kind == "attention" and x.mixer.scale is not None for x in ir.layers) or \
        any(x.kind == "moe" and x.mixer.routing == "topk_softmax" and x.mixer.shared_d_ff for x in ir.layers)


def logits_scaling(scale: float) -> float:
    """The `logits_scaling` L whose import, 1.0 / L, is exactly the model's logit_scale (1 / (1 / L) is not
    always L in floating point, so the neighbours of 1 / scale are tried)."""
    import math

    low = high = 1.0 / scale
    for _ in range(8):
        for candidate in (low, high):
            if 1.0 / candidate == scale:
                return candidate
        low, high = math.nextafter(low, 0.0), math.nextafter(high, math.inf)
    raise HFError(f"logit_scale {scale!r} is 1 / L for no floating-point logits_scaling L")


def config(ir, base: dict, eps: float) -> dict:
    """The config.json fields of a model `fits` accepted (HFError for what Granite-4.0-H cannot hold)."""
    from ltmdsl.hf.export import _kind_fields, _one

    if ir.logit_cap is not None:
        raise HFError("Granite-4.0-H has no logit soft cap")
    mixers = [x.mixer for x in ir.layers[0::2]]
    ffn = _one([x.mixer for x in ir.layers[1::2]], "FFN settings (Granite-4.0-H has one MoE or shared MLP setting)")
    fields = _kind_fields(mixers, MODEL_TYPE, ir.d_model)
    if not any(m.kind == "attention" for m in mixers):  # unused sizes that GraniteMoeHybridConfig still checks
        fields["num_attention_heads"] = 1
    if not any(m.kind == "mamba2" for m in mixers):
        fields["mamba_n_heads"] = 1
    return {**base, "model_type": MODEL_TYPE, "num_hidden_layers": len(mixers), "rms_norm_eps": eps,
            "hidden_act": "silu", "embedding_multiplier": ir.embed_scale, "residual_multiplier": ir.residual_scale,
            "logits_scaling": logits_scaling(ir.logit_scale), **fields,
            **hf_facet(ffn.kind).write(ffn, MODEL_TYPE, ir.d_model),
            "layer_types": ["full_attention" if m.kind == "attention" else "linear_attention" for m in mixers]}
