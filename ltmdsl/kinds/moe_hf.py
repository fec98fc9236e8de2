"""The Hugging Face facet of moe (see ltmdsl.hf.facet): config keys, expert layouts and export fields.

Experts follow the mixer in Mixtral and MiniMax (`num_local_experts`, `num_experts_per_tok`; softmax, top k,
renormalised; MiniMax's checkpoints use Mixtral's names) and on Jamba's expert layers (`num_experts`, alias
`num_local_experts`; softmax then top k).
Their weights come in two layouts, and both are read:
- per expert, as published checkpoints and `save_pretrained` (by default) store them: Mixtral
  `block_sparse_moe.experts.{j}.w1/w3/w2.weight` (gate/up/down) and `block_sparse_moe.gate.weight`,
  Jamba `feed_forward.experts.{j}.gate_proj/up_proj/down_proj.weight` and `feed_forward.router.weight`;
  op "stack" stacks them on a new dim 0;
- fused, as transformers 5 keeps them in memory and writes them with `save_pretrained(...,
  save_original_format=False)`: `experts.gate_up_proj [E, 2F, d]` (gate rows first, then up; ops
  "first_half" / "second_half") and `experts.down_proj [E, d, F]`, with Mixtral's block renamed `mlp`.
Qwen3-Next (`num_experts`, `num_experts_per_tok`, `moe_intermediate_size`; softmax over all experts, top k,
renormalised when `norm_topk_prob`) adds a shared SwiGLU expert of `shared_expert_intermediate_size` gated by
sigmoid(x . shared_expert_gate): `mlp.gate.weight`, `mlp.experts.{j}.gate_proj/up_proj/down_proj.weight` (or
fused as above), `mlp.shared_expert.*` and `mlp.shared_expert_gate.weight`.
DeepSeek-V2 / V3 (`n_routed_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `n_shared_experts`,
`routed_scaling_factor`, and their routers' keys: `_deepseek`) keep the same per-expert or fused layout under
`mlp`, with `mlp.gate.weight`, the shared experts as one MLP `mlp.shared_experts.*` and DeepSeek-V3's selection
bias `mlp.gate.e_score_correction_bias` (the runtime's `selection_bias` buffer).
Qwen3.5-MoE is Qwen3-Next's block with the top k always renormalised (its router has no `norm_topk_prob`).
Kimi-Linear's MoE (`_kimi`: KimiLinearConfig's saved names `num_experts`, `num_experts_per_token`,
`num_shared_experts`, `num_expert_group`, `moe_renormalize`, or their aliases) routes as DeepSeek-V3 does and
is laid out as Mixtral's: per expert `block_sparse_moe.experts.{j}.w1/w3/w2.weight` or fused under `mlp`, with
`gate.weight`, `gate.e_score_correction_bias` and `shared_experts.*`.
Nemotron-H / Nemotron-3 (NemotronHMoE; `n_routed_experts`, alias `num_local_experts`, `num_experts_per_tok`,
`moe_intermediate_size`, `moe_shared_expert_intermediate_size`): relu2 experts with up and down projections
only, routed by sigmoid scores plus the `e_score_correction_bias` buffer (selection_bias) within the `topk_group`
best of `n_group` groups (each scored by its two best), renormalised when `norm_topk_prob`, times
`routed_scaling_factor`; one relu2 shared expert. Tensors under `mixer`: `gate.weight`,
`gate.e_score_correction_bias`, `experts.{j}.up_proj/down_proj.weight` (fused: `experts.up_proj [E, F, d]`,
`experts.down_proj`), `shared_experts.up_proj/down_proj.weight`. Its latent projections (`moe_latent_size`)
are refused by name.
Granite-4.0-H (granitemoehybrid; `num_local_experts` > 0, `num_experts_per_tok`, `intermediate_size`,
`shared_intermediate_size`): SwiGLU experts routed by a softmax over the top-k logits (topk_softmax), plus the
always-present SwiGLU `shared_mlp`, summed in its decoder layer. Its published tensors are fused:
`block_sparse_moe.input_linear.weight [E, 2F, d]` (gate rows, then up), `block_sparse_moe.output_linear.weight`,
`block_sparse_moe.router.layer.weight` (transformers 5 in memory: `experts.gate_up_proj`, `experts.down_proj`,
`router.weight`), and `shared_mlp.input_linear.weight [2Fs, d]`, `shared_mlp.output_linear.weight`.
The runtime stores `experts.gate_proj/up_proj [E, F, d]`, `experts.down_proj [E, d, F]` and `router.weight`
(and `shared.*`, `shared_gate.weight`).
Export writes the per-expert layout unless asked for the fused one.
Qwen3-MoE names its experts as Qwen3-Next does, without a shared expert. gpt-oss and Llama-4 store their
experts only fused and transposed (`FUSED_T`): gpt-oss `mlp.experts.gate_up_proj [E, d, 2F]` with gate and up
columns interleaved, `gate_up_proj_bias [E, 2F]` likewise, `down_proj [E, F, d]`, `down_proj_bias [E, d]` and a
biased `mlp.router`; Llama-4 `feed_forward.experts.gate_up_proj [E, d, 2F]` (gate columns, then up),
`down_proj [E, F, d]`, `feed_forward.router` and `feed_forward.shared_expert`.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext, Site, Source
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num, show_value

#: family -> (router module inside the MoE block, per-expert gate / up / down names)
NAMES = {"mixtral": ("gate", ("w1", "w3", "w2")), "jamba": ("router", ("gate_proj", "up_proj", "down_proj")),
         "qwen3_next": ("gate", ("gate_proj", "up_proj", "down_proj")),
         "qwen3_5_moe": ("gate", ("gate_proj", "up_proj", "down_proj")), "kimi_linear": ("gate", ("w1", "w3", "w2")),
         **{f: ("gate", ("gate_proj", "up_proj", "down_proj")) for f in ("deepseek_v2", "deepseek_v3")},
         "qwen3_moe": ("gate", ("gate_proj", "up_proj", "down_proj")), "minimax": ("gate", ("w1", "w3", "w2"))}
_WHICH = {"experts.gate_proj": 0, "experts.up_proj": 1, "experts.down_proj": 2}


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family in ("mixtral", "minimax"):
        experts, top_k, key, routing = r.int("num_local_experts", 8), r.int("num_experts_per_tok", 2), \
            "num_local_experts", "softmax_topk_renorm"
    elif ctx.family == "jamba":
        experts = r.int("num_experts", r.cfg.get("num_local_experts", 16))
        r.raw("num_local_experts", None)
        top_k, key, routing = r.int("num_experts_per_tok", 2), "num_experts", "softmax_topk"
    elif ctx.family in ("qwen3_next", "qwen3_5_moe"):
        experts = r.int("num_experts", 512, minimum=1 if ctx.present else 0)  # 0: no expert layers
        top_k, key = r.int("num_experts_per_tok", 10), "num_experts"
        if ctx.family == "qwen3_5_moe":  # Qwen3_5MoeTopKRouter always renormalises; its config has no such key
            r.expect("norm_topk_prob", lambda v: v in (None, True), "true (transformers' Qwen3.5 router always "
                     "renormalises the top-k weights)")
            routing = "softmax_topk_renorm"
        else:
            routing = "softmax_topk_renorm" if r.bool("norm_topk_prob", True) else "softmax_topk"
        d_ff, shared = r.int("moe_intermediate_size", 512), r.int("shared_expert_intermediate_size", 512)
        if ctx.present and top_k > experts:
            raise r.fail(f"num_experts_per_tok {top_k} > {key} {experts}")
        return dict(experts=experts, top_k=top_k, d_ff=d_ff, routing=routing, shared_d_ff=shared, shared_gate=True)
    elif ctx.family in DEEPSEEK:
        return _deepseek(r, ctx)
    elif ctx.family == "kimi_linear":
        return _kimi(r, ctx)
    elif ctx.family == "nemotron_h":
        return _nemotron_h(r, ctx)
    elif ctx.family == "granitemoehybrid":  # the family reads num_local_experts (0: a dense shared_mlp only)
        top_k = r.int("num_experts_per_tok", 2, minimum=0)  # dense (num_local_experts 0, Micro): 0, unused
        d_ff, shared = r.int("intermediate_size", 11008), ctx.shared["shared_d_ff"]
        experts = ctx.shared["experts"]
        if ctx.present and not 1 <= top_k <= experts:
            raise r.fail(f"num_experts_per_tok {top_k} must be from 1 to num_local_experts {experts}")
        return dict(experts=experts, top_k=top_k, d_ff=d_ff, routing="topk_softmax", shared_d_ff=shared) \
            if ctx.present else {}
    else:
        raise HFError(f"internal: moe has no reader for {ctx.family}")
    if top_k > experts:
        raise r.fail(f"num_experts_per_tok {top_k} > {key} {experts}")
    return dict(experts=experts, top_k=top_k, d_ff=ctx.shared["d_ff"], routing=routing)


#: DeepSeek-V2 / V3 (DeepseekV2Moe / DeepseekV3MoE under `mlp`): routed experts, `n_shared_experts` shared
#: experts fused into one MLP of moe_intermediate_size * n_shared_experts (`shared_experts.*`), the router
#: `gate.weight`, and DeepSeek-V3's selection bias `gate.e_score_correction_bias`.
DEEPSEEK = ("deepseek_v2", "deepseek_v3")
#: model_type -> its config class's defaults: n_routed_experts, num_experts_per_tok, moe_intermediate_size,
#: n_shared_experts, routed_scaling_factor, and the alias transformers' attribute_map gives n_routed_experts.
_DEEPSEEK_DEFAULTS = {"deepseek_v2": (64, None, 1407, 2, 1.0, "num_experts"),
                      "deepseek_v3": (256, 8, 2048, 1, 2.5, "num_local_experts")}
_DEEPSEEK_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group",
                  "topk_method", "norm_topk_prob", "scoring_func")


def _deepseek(r: Reader, ctx: ReadContext) -> dict:
    """DeepSeek's MoE as transformers computes it.

    V2 (DeepseekV2TopkRouter): softmax scores; `topk_method` "greedy" (top-k of all experts) or
    "group_limited_greedy" (`n_group` groups scored by their best expert, the `topk_group` best eligible); the
    weights are not renormalised (transformers ignores norm_topk_prob, so true is refused), times
    routed_scaling_factor. V3 (DeepseekV3TopkRouter): sigmoid scores, the selection bias added to choose, groups
    scored by their two best (n_group, topk_group), renormalised when norm_topk_prob, times routed_scaling_factor;
    transformers always routes so, so only topk_method "noaux_tc" and scoring_func "sigmoid" are accepted.
    """
    fam = ctx.family
    experts_d, top_k_d, d_ff_d, shared_d, scale_d, alias = _DEEPSEEK_DEFAULTS[fam]
    if not ctx.present:  # no expert layer (first_k_dense_replace >= num_hidden_layers): the keys are unused
        r.used.update(_DEEPSEEK_KEYS)
        return {}
    experts = r.int("n_routed_experts", experts_d)
    if r.present(alias) and r.int(alias) != experts:
        raise r.fail(f"'{alias}' ({r.cfg[alias]}) disagrees with 'n_routed_experts' ({experts}); it is an alias")
    r.raw(alias, None)
    # DeepseekV2Config's default is None, which its router cannot run: then the key must be stated
    top_k = r.int("num_experts_per_tok") if top_k_d is None else r.int("num_experts_per_tok", top_k_d)
    if top_k > experts:
        raise r.fail(f"num_experts_per_tok {top_k} > n_routed_experts {experts}")
    d_ff = r.int("moe_intermediate_size", d_ff_d)
    shared = r.int("n_shared_experts", shared_d, minimum=0)
    scale = r.float("routed_scaling_factor", scale_d)
    v = dict(experts=experts, top_k=top_k, d_ff=d_ff, shared_d_ff=shared * d_ff, routed_scale=scale)
    if fam == "deepseek_v2":
        r.expect("scoring_func", lambda x: x in (None, "softmax"), "'softmax' (transformers' DeepSeek-V2 router)")
        r.expect("norm_topk_prob", lambda x: x in (None, False),
                 "false (transformers' DeepSeek-V2 router never renormalises the top-k weights)")
        method = r.raw("topk_method", "greedy")
        v["routing"] = "softmax_topk"
        if method == "group_limited_greedy":
            v.update(groups=r.int("n_group"), top_groups=r.int("topk_group"), group_score="max")
        elif method == "greedy":
            r.raw("n_group", None)
            r.raw("topk_group", None)  # unused by greedy selection
        else:
            r.unsupported("topk_method", "'greedy' or 'group_limited_greedy' (transformers' DeepSeek-V2 router)")
        return v
    r.expect("scoring_func", lambda x: x in (None, "sigmoid"), "'sigmoid' (transformers' DeepSeek-V3 router)")
    r.expect("topk_method", lambda x: x in (None, "noaux_tc"), "'noaux_tc' (transformers' DeepSeek-V3 router)")
    groups, top_groups = r.int("n_group", 8), r.int("topk_group", 4)
    if groups == 1 and top_groups != 1:
        raise r.fail(f"'topk_group' ({top_groups}) must be 1 when 'n_group' is 1")
    if groups > 1:
        v.update(groups=groups, top_groups=top_groups, group_score="top2_sum")
    v.update(routing="sigmoid_topk_renorm" if r.bool("norm_topk_prob", True) else "sigmoid_topk", selection_bias=True)
    return v


#: KimiLinearConfig's MoE keys: the name it saves (its attribute_map's target) -> (the alias, the default).
_KIMI = {"num_experts": ("num_local_experts", 256), "num_experts_per_token": ("num_experts_per_tok", 8),
         "num_shared_experts": ("n_shared_experts", 1), "num_expert_group": ("n_group", 1),
         "moe_renormalize": ("norm_topk_prob", True)}


def _kimi_key(r: Reader, key: str, read):
    """A Kimi MoE key under its saved name or its alias (both stated: they must agree)."""
    alias, default = _KIMI[key]
    value = read(key, default) if r.present(key) or not r.present(alias) else read(alias, default)
    if r.present(key) and r.present(alias) and read(alias, default) != value:
        raise r.fail(f"'{alias}' ({show_value(r.cfg[alias])}) disagrees with '{key}' ({show_value(r.cfg[key])}); "
                     "it is an alias")
    r.raw(key, None)
    r.raw(alias, None)
    return value


def _kimi(r: Reader, ctx: ReadContext) -> dict:
    """Kimi-Linear's MoE (KimiLinearMoE: routed experts, `num_shared_experts` shared ones fused into one SwiGLU MLP
    of moe_intermediate_size * num_shared_experts, ungated). Its router (KimiLinearTopkRouter) is DeepSeek-V3's:
    sigmoid scores, the selection bias `e_score_correction_bias`, groups scored by their two best
    (`num_expert_group`, `topk_group`), renormalised when `moe_renormalize`, times `routed_scaling_factor`. The
    original code's `moe_router_activation_func` must be sigmoid and `use_grouped_topk` true wherever groups
    matter: transformers always routes so."""
    experts = _kimi_key(r, "num_experts", r.int)
    top_k = _kimi_key(r, "num_experts_per_token", r.int)
    shared = _kimi_key(r, "num_shared_experts", lambda k, dflt: r.int(k, dflt, minimum=0))
    groups = _kimi_key(r, "num_expert_group", r.int)
    renorm = _kimi_key(r, "moe_renormalize", r.bool)
    top_groups = r.int("topk_group", 1)
    d_ff, scale = r.int("moe_intermediate_size", 1024), r.float("routed_scaling_factor", 2.446)
    r.expect("moe_router_activation_func", lambda v: v in (None, "sigmoid"), "'sigmoid' (transformers' Kimi router)")
    r.expect("use_grouped_topk", lambda v: v in (None, True) or (v is False and groups == 1),
             "true (transformers' Kimi router always selects by groups)")
    if not ctx.present:
        return {}
    if top_k > experts:
        raise r.fail(f"num_experts_per_token {top_k} > num_experts {experts}")
    if experts % groups or top_groups > groups or (groups == 1 and top_groups != 1):
        raise r.fail(f"'num_expert_group' ({groups}) must divide 'num_experts' ({experts}) and 'topk_group' "
                     f"({top_groups}) must be at most the groups (1 without groups)")
    v = dict(experts=experts, top_k=top_k, d_ff=d_ff, shared_d_ff=shared * d_ff, routed_scale=scale,
             routing="sigmoid_topk_renorm" if renorm else "sigmoid_topk", selection_bias=True)
    if groups > 1:
        v.update(groups=groups, top_groups=top_groups, group_score="top2_sum")
    return v


def _routing_text(v: dict) -> str:
    """The routing variants' keywords (DeepSeek's groups, selection bias, scale), those off their defaults."""
    out = ""
    if v.get("groups", 1) > 1:
        out += f", groups = {num(v['groups'])}, top_groups = {num(v['top_groups'])}"
        out += f", group_score = {v['group_score']}" if v.get("group_score") else ""
    if v.get("selection_bias"):
        out += ", selection_bias = true"
    if v.get("routed_scale", 1.0) != 1.0:
        out += f", routed_scale = {num(float(v['routed_scale']))}"
    return out


def _deepseek_fields(f, fam: str) -> dict:
    """DeepSeek-V2 / V3 config fields of an MoE, or HFError saying what the family's router cannot do."""
    other = [x for x in f.beyond_plain() if x not in ("groups", "top_groups", "group_score", "selection_bias",
                                                       "routed_scale", "shared_d_ff")]
    if f.activation != "swiglu" or other:
        raise HFError(f"DeepSeek's experts are SwiGLU without biases, gates or input weighting (this MoE has "
                      f"{', '.join(other) or 'act = ' + f.activation})")
    if f.shared_d_ff % f.d_ff:
        raise HFError(f"DeepSeek's shared experts are n_shared_experts * moe_intermediate_size wide; shared_d_ff "
                      f"{f.shared_d_ff} is not a multiple of d_ff {f.d_ff}")
    out = {"n_routed_experts": f.experts, "num_experts_per_tok": f.top_k, "moe_intermediate_size": f.d_ff,
           "n_shared_experts": f.shared_d_ff // f.d_ff, "routed_scaling_factor": f.routed_scale}
    if fam == "deepseek_v2":
        if f.routing != "softmax_topk" or f.selection_bias or (f.groups > 1 and f.group_score != "max"):
            raise HFError("DeepSeek-V2 routes with softmax_topk (no renormalisation, no selection bias), in groups "
                          "scored by their best expert (group_score max)")
        grouped = f.groups > 1
        return {**out, "topk_method": "group_limited_greedy" if grouped else "greedy", "norm_topk_prob": False,
                "n_group": f.groups if grouped else None, "topk_group": f.top_groups if grouped else None}
    if f.routing not in ("sigmoid_topk_renorm", "sigmoid_topk") or not f.selection_bias or \
            (f.groups > 1 and f.group_score != "top2_sum"):
        raise HFError("DeepSeek-V3 routes with sigmoid scores and a selection bias (sigmoid_topk_renorm or "
                      "sigmoid_topk, selection_bias = true), in groups scored by their two best (top2_sum)")
    return {**out, "n_group": f.groups, "topk_group": f.top_groups, "norm_topk_prob": f.renormalise}


def _nemotron_h(r: Reader, ctx: ReadContext) -> dict:
    """NemotronHMoE's settings (module docstring); read and checked whether or not the pattern has MoE layers,
    as NemotronHConfig holds them either way."""
    experts = r.int("n_routed_experts", r.cfg.get("num_local_experts", 8))
    if r.present("num_local_experts") and r.int("num_local_experts") != experts:
        raise r.fail(f"'num_local_experts' {r.cfg['num_local_experts']} disagrees with 'n_routed_experts' {experts}")
    r.raw("num_local_experts", None)
    top_k = r.int("num_experts_per_tok", 2)
    d_ff, shared = r.int("moe_intermediate_size", 7688), r.int("moe_shared_expert_intermediate_size", 7688)
    r.expect("n_shared_experts", lambda v: v in (None, 1), "1 (NemotronHMoE has one shared expert of "
             "moe_shared_expert_intermediate_size)", 1)
    r.expect("moe_latent_size", lambda v: v is None, "null (the latent projections fc1_latent_proj / fc2_latent_proj "
             "around the experts are not in ltmdsl's moe)")
    r.bool("moe_shared_expert_overlap", True)  # overlaps the shared expert with dispatch: scheduling only
    scale = r.float("routed_scaling_factor", 1.0)
    groups, top_groups = r.int("n_group", 1), r.int("topk_group", 1)
    renorm = r.bool("norm_topk_prob", True)
    if not ctx.present:
        return {}
    if experts % groups or top_groups > groups:
        raise r.fail(f"'n_group' {groups} must divide 'n_routed_experts' {experts} and be at least 'topk_group' "
                     f"{top_groups}")
    if experts // groups < 2:  # NemotronHTopkRouter scores each group by its two best experts
        raise r.fail(f"'n_routed_experts' / 'n_group' = {experts // groups}; transformers scores each group by its "
                     "two best experts, so it needs at least 2")
    if top_k > top_groups * (experts // groups):
        raise r.fail(f"num_experts_per_tok {top_k} > the {top_groups * (experts // groups)} experts that 'topk_group' "
                     f"{top_groups} of 'n_group' {groups} groups of 'n_routed_experts' {experts} leave eligible")
    return dict(experts=experts, top_k=top_k, d_ff=d_ff, act="relu2",
                routing="sigmoid_topk_renorm" if renorm else "sigmoid_topk", shared_d_ff=shared,
                selection_bias=True, routed_scale=scale, groups=groups, top_groups=top_groups)


def _granite_misfit(f) -> str | None:
    if f.activation != "swiglu" or f.routing != "topk_softmax" or not f.shared_d_ff or f.variants() != ("shared_d_ff",):
        return ("Granite-4.0-H's MoE has swiglu experts routed by topk_softmax and an ungated swiglu shared expert "
                "(shared_mlp), and no other variant")
    return None


def _nemotron_h_misfit(f) -> str | None:
    if f.activation != "relu2" or f.routing not in ("sigmoid_topk_renorm", "sigmoid_topk") or not f.selection_bias \
            or not f.shared_d_ff or f.shared_gate or f.group_score != "top2_sum" or f.router_bias or f.expert_bias \
            or f.weight_input:
        return ("Nemotron-H's MoE has relu2 experts, sigmoid_topk(_renorm) routing with selection_bias (grouped by "
                "top2_sum, if at all) and an ungated relu2 shared expert; no biases, no weight_input")
    if f.experts // f.groups < 2:
        return "Nemotron-H's router scores each expert group by its two best experts, so groups need 2 experts"
    return None


#: the activations a family's experts may have (identifiers that reach the spec text)
ACTIVATIONS = ("swiglu", "swiglu_clamped", "relu2")


def call(v: dict) -> str:
    """`moe(...)` from validated values: act (default swiglu), gpt-oss's clamp numbers, the routing variants
    (DeepSeek's groups, selection bias, scale), biases, a shared expert (and its gate) and Llama-4's input
    weighting, each only when set."""
    act = v.get("act", "swiglu")
    if act not in ACTIVATIONS:
        raise HFError(f"internal: expert activation {act!r}")
    extra = "".join(f", {k} = {num(float(v[k]))}" for k in ("swiglu_limit", "swiglu_alpha") if v.get(k) is not None)
    extra += _routing_text(v)
    extra += f", shared_d_ff = {num(v['shared_d_ff'])}" if v.get("shared_d_ff") else ""
    extra += "".join(f", {flag} = true" for flag in ("shared_gate", "router_bias", "expert_bias", "weight_input")
                     if v.get(flag))
    return (f"moe(experts = {num(v['experts'])}, top_k = {num(v['top_k'])}, d_ff = {num(v['d_ff'])}, act = {act}, "
            f"routing = {v['routing']}{extra})")


def write(f, fam: str, d: int) -> dict:
    if fam in DEEPSEEK:
        return _deepseek_fields(f, fam)
    if fam == "kimi_linear":  # DeepSeek-V3's router and shared experts, in KimiLinearConfig's saved key names
        try:
            fields = _deepseek_fields(f, "deepseek_v3")
        except HFError as e:
            raise HFError(f"Kimi-Linear's MoE is DeepSeek-V3's: {e.message}") from None
        return {"num_experts": f.experts, "num_experts_per_token": f.top_k, "moe_intermediate_size": f.d_ff,
                "num_shared_experts": fields["n_shared_experts"], "routed_scaling_factor": f.routed_scale,
                "num_expert_group": f.groups, "topk_group": f.top_groups, "moe_renormalize": f.renormalise}
    if fam == "qwen3_5_moe":
        if f.activation != "swiglu" or f.routing != "softmax_topk_renorm" or not f.shared_d_ff or not f.shared_gate \
                or set(f.variants()) - {"shared_d_ff", "shared_gate"}:
            raise HFError("Qwen3.5's experts use swiglu, softmax_topk_renorm routing and a gated shared expert")
        return {"num_experts": f.experts, "num_experts_per_tok": f.top_k, "moe_intermediate_size": f.d_ff,
                "shared_expert_intermediate_size": f.shared_d_ff}
    if fam == "granitemoehybrid":
        why = _granite_misfit(f)
        if why:
            raise HFError(why)
        return {"num_local_experts": f.experts, "num_experts_per_tok": f.top_k, "intermediate_size": f.d_ff,
                "shared_intermediate_size": f.shared_d_ff}
    if fam == "nemotron_h":
        why = _nemotron_h_misfit(f)
        if why:
            raise HFError(why)
        return {"n_routed_experts": f.experts, "num_experts_per_tok": f.top_k, "moe_intermediate_size": f.d_ff,
                "moe_shared_expert_intermediate_size": f.shared_d_ff, "n_shared_experts": 1,
                "routed_scaling_factor": f.routed_scale, "n_group": f.groups, "topk_group": f.top_groups,
                "norm_topk_prob": f.renormalise, "mlp_hidden_act": "relu2"}
    if fam == "qwen3_next":
        if f.activation != "swiglu" or f.routing not in ("softmax_topk_renorm", "softmax_topk") \
                or not f.shared_d_ff or not f.shared_gate:
            raise HFError("Qwen3-Next's experts use swiglu, softmax_topk(_renorm) routing and a gated shared expert")
        return {"num_experts": f.experts, "num_experts_per_tok": f.top_k, "moe_intermediate_size": f.d_ff,
                "shared_expert_intermediate_size": f.shared_d_ff, "norm_topk_prob": f.renormalise}
    if fam in ("mixtral", "minimax"):
        if f.routing not in ("softmax_topk_renorm", "topk_softmax") or f.activation != "swiglu":
            raise HFError("MoE after RoPE attention maps to Mixtral only with swiglu and softmax_topk_renorm routing")
        return {"intermediate_size": f.d_ff, "num_local_experts": f.experts, "num_experts_per_tok": f.top_k}
    if fam == "jamba":
        if f.activation != "swiglu":
            raise HFError("Jamba's MLPs and experts use swiglu")
        if f.routing != "softmax_topk":
            raise HFError("Jamba routes with softmax_topk (no renormalisation)")
        return {"intermediate_size": f.d_ff, "num_experts": f.experts, "num_experts_per_tok": f.top_k}
    raise HFError(f"{fam} has no mixture-of-experts layers")


def misfit(f, fam: str) -> str | None:
    if fam == "nemotron_h":
        return _nemotron_h_misfit(f)
    if fam == "granitemoehybrid":
        return _granite_misfit(f)
    if fam in ("qwen3_next", "qwen3_5_moe", "kimi_linear") or fam in DEEPSEEK:
        try:
            write(f, fam, 1)
        except HFError as e:
            return e.message
        return None
    if fam in ("llama", "mixtral", "jamba", "minimax"):
        return None if f.activation == "swiglu" else f"its activation is {f.activation}; the family uses swiglu"
    return f"{fam} has no mixture-of-experts layers"


def traits(f) -> frozenset[str]:
    return frozenset({f.activation, "experts"})


def _layout(modules: tuple[str, ...], gate: str, site: Site) -> tuple[str, bool]:
    """(block module, fused?) of this MoE in the checkpoint; per-expert under the first name if unknown."""
    if site.fused is not None:
        return (modules[-1] if site.fused else modules[0]), site.fused
    if site.available is not None:
        for module in modules:
            if f"{site.block}{module}.experts.gate_up_proj" in site.available:
                return module, True
            if f"{site.block}{module}.experts.0.{gate}.weight" in site.available:
                return module, False
    return modules[0], False


#: Families whose experts exist only fused and transposed (gate_up_proj [E, d, 2F], down_proj [E, F, d]): the
#: runtime's expert tensor -> (the checkpoint tensor under `experts.`, op). gpt-oss interleaves gate and up
#: columns (gate, up, gate, ...) and has biases; Llama-4 puts the gate's columns first, then up's.
FUSED_T = {
    "gpt_oss": {"experts.gate_proj": ("gate_up_proj", "even_t"), "experts.up_proj": ("gate_up_proj", "odd_t"),
                "experts.down_proj": ("down_proj", "transpose"), "experts.gate_bias": ("gate_up_proj_bias", "even"),
                "experts.up_bias": ("gate_up_proj_bias", "odd"), "experts.down_bias": ("down_proj_bias", "copy")},
    "llama4_text": {"experts.gate_proj": ("gate_up_proj", "first_half_t"),
                    "experts.up_proj": ("gate_up_proj", "second_half_t"),
                    "experts.down_proj": ("down_proj", "transpose")},
}
#: the router's and the shared expert's modules of those families
_FUSED_T_MODULES = {"gpt_oss": ("router", None), "llama4_text": ("router", "shared_expert")}


def _fused_t(facet: HFFacet, rest: str, site: Site) -> Source | None:
    block = f"{site.block}{facet.modules[site.family][0]}."
    router, shared = _FUSED_T_MODULES[site.family]
    head, _, tail = rest.partition(".")
    if head == "router":
        return Source((f"{block}{router}.{tail}",))
    if head == "shared" and shared:
        return Source((f"{block}{shared}.{tail}",))
    name, op = FUSED_T[site.family].get(rest, (None, None))
    return None if name is None else Source((f"{block}experts.{name}",), op)


def _nemotron_h_tensors(rest: str, site: Site) -> Source | None:
    """NemotronHMoE's tensors under `mixer.`: router `gate`, per-expert or fused up/down, `shared_experts`."""
    block = f"{site.block}mixer."
    if rest in ("router.weight", "selection_bias"):
        return Source((f"{block}gate.{'weight' if rest == 'router.weight' else 'e_score_correction_bias'}",))
    if rest.startswith("shared."):
        return Source((f"{block}shared_experts.{rest.split('.', 1)[1]}",))
    which = {"experts.up_proj": "up_proj", "experts.down_proj": "down_proj"}.get(rest)
    if which is None:
        return None
    fused = site.fused if site.fused is not None else \
        site.available is not None and f"{block}experts.up_proj" in site.available
    if fused:
        return Source((f"{block}experts.{which}",))
    return Source(tuple(f"{block}experts.{j}.{which}.weight" for j in range(site.experts)), "stack")


#: Granite-4.0-H's names for the routed experts: (published, transformers 5) per runtime tensor.
_GRANITE = {"router.weight": ("router.layer.weight", "router.weight"),
            "experts.gate_proj": ("input_linear.weight", "experts.gate_up_proj"),
            "experts.up_proj": ("input_linear.weight", "experts.gate_up_proj"),
            "experts.down_proj": ("output_linear.weight", "experts.down_proj")}


def granite_shared(rest: str, site: Site) -> Source:
    """Granite-4.0-H's `shared_mlp` (a SwiGLU MLP whose gate and up rows share `input_linear`), behind runtime
    `gate_proj.weight` / `up_proj.weight` / `down_proj.weight`; the dense MLP of its expert-free configs too
    (another name keeps its own under shared_mlp, which no Granite checkpoint has: reported as missing)."""
    module = {"gate_proj.weight": "input_linear.weight", "up_proj.weight": "input_linear.weight",
              "down_proj.weight": "output_linear.weight"}.get(rest, rest)
    op = {"gate_proj.weight": "first_half", "up_proj.weight": "second_half"}.get(rest, "copy")
    return Source((f"{site.block}shared_mlp.{module}",), op)


def _granite_tensors(rest: str, site: Site) -> Source | None:
    if rest.startswith("shared."):
        return granite_shared(rest.split(".", 1)[1], site)
    names = _GRANITE.get(rest)
    if names is None:
        return None
    fused = site.fused if site.fused is not None else \
        site.available is not None and f"{site.block}block_sparse_moe.{names[1]}" in site.available \
        and f"{site.block}block_sparse_moe.{names[0]}" not in site.available
    op = {"experts.gate_proj": "first_half", "experts.up_proj": "second_half"}.get(rest, "copy")
    return Source((f"{site.block}block_sparse_moe.{names[1 if fused else 0]}",), op)


def tensors(facet: HFFacet, rest: str, site: Site) -> Source | None:
    if site.family in FUSED_T:
        return _fused_t(facet, rest, site)
    if site.family == "nemotron_h":
        return _nemotron_h_tensors(rest, site)
    if site.family == "granitemoehybrid":
        return _granite_tensors(rest, site)
    router, names = NAMES[site.family]
    module, fused = _layout(facet.modules[site.family], names[0], site)
    block = f"{site.block}{module}."
    if rest.startswith("router."):
        return Source((f"{block}{router}.{rest.split('.', 1)[1]}",))
    if (site.family in DEEPSEEK or site.family == "kimi_linear") and rest.startswith("shared."):
        return Source((f"{block}shared_experts.{rest.split('.', 1)[1]}",))
    if rest == "selection_bias":
        return Source((f"{block}{router}.e_score_correction_bias",))
    if site.family in ("qwen3_next", "qwen3_5_moe") and rest.startswith(("shared.", "shared_gate.")):
        head, tail = rest.split(".", 1)
        return Source((f"{block}{'shared_expert' if head == 'shared' else 'shared_expert_gate'}.{tail}",))
    which = _WHICH.get(rest)
    if which is None:
        return None
    if fused:
        if which == 2:
            return Source((f"{block}experts.down_proj",))
        return Source((f"{block}experts.gate_up_proj",), "first_half" if which == 0 else "second_half")
    return Source(tuple(f"{block}experts.{j}.{names[which]}.weight" for j in range(site.experts)), "stack")


HF = HFFacet(name="moe", label="MoE", families=("mixtral", "jamba", "qwen3_next", *DEEPSEEK, "qwen3_5_moe",
                                                "kimi_linear", "nemotron_h", "granitemoehybrid", "minimax"),
             modules={"mixtral": ("block_sparse_moe", "mlp"), "jamba": ("feed_forward",), "qwen3_next": ("mlp",),
                      **{f: ("mlp",) for f in DEEPSEEK}, "qwen3_5_moe": ("mlp",),
                      "kimi_linear": ("block_sparse_moe", "mlp"), "qwen3_moe": ("mlp",), "gpt_oss": ("mlp",),
                      "llama4_text": ("feed_forward",), "nemotron_h": ("mixer",),
                      "granitemoehybrid": ("block_sparse_moe", "shared_mlp"),
                      "minimax": ("block_sparse_moe", "mlp")},
             read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors)
