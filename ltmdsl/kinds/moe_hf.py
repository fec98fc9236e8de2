"""The Hugging Face facet of moe (see ltmdsl.hf.facet): config keys, expert layouts and export fields.

Experts follow the mixer in Mixtral (`num_local_experts`, `num_experts_per_tok`; softmax over the top k,
renormalised) and on Jamba's expert layers (`num_experts`, alias `num_local_experts`; softmax then top k).
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
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext, Site, Source
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num

#: family -> (router module inside the MoE block, per-expert gate / up / down names)
NAMES = {"mixtral": ("gate", ("w1", "w3", "w2")), "jamba": ("router", ("gate_proj", "up_proj", "down_proj")),
         "qwen3_next": ("gate", ("gate_proj", "up_proj", "down_proj"))}
_WHICH = {"experts.gate_proj": 0, "experts.up_proj": 1, "experts.down_proj": 2}


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family == "mixtral":
        experts, top_k, key, routing = r.int("num_local_experts", 8), r.int("num_experts_per_tok", 2), \
            "num_local_experts", "softmax_topk_renorm"
    elif ctx.family == "jamba":
        experts = r.int("num_experts", r.cfg.get("num_local_experts", 16))
        r.raw("num_local_experts", None)
        top_k, key, routing = r.int("num_experts_per_tok", 2), "num_experts", "softmax_topk"
    elif ctx.family == "qwen3_next":
        experts = r.int("num_experts", 512, minimum=1 if ctx.present else 0)  # 0: no expert layers
        top_k, key = r.int("num_experts_per_tok", 10), "num_experts"
        routing = "softmax_topk_renorm" if r.bool("norm_topk_prob", True) else "softmax_topk"
        d_ff, shared = r.int("moe_intermediate_size", 512), r.int("shared_expert_intermediate_size", 512)
        if ctx.present and top_k > experts:
            raise r.fail(f"num_experts_per_tok {top_k} > {key} {experts}")
        return dict(experts=experts, top_k=top_k, d_ff=d_ff, routing=routing, shared_d_ff=shared, shared_gate=True)
    elif ctx.family == "nemotron_h":
        return _nemotron_h(r, ctx)
    elif ctx.family == "granitemoehybrid":  # the family reads num_local_experts (0: a dense shared_mlp only)
        top_k = r.int("num_experts_per_tok", 2)
        d_ff, shared = r.int("intermediate_size", 11008), ctx.shared["shared_d_ff"]
        experts = ctx.shared["experts"]
        if ctx.present and top_k > experts:
            raise r.fail(f"num_experts_per_tok {top_k} > num_local_experts {experts}")
        return dict(experts=experts, top_k=top_k, d_ff=d_ff, routing="topk_softmax", shared_d_ff=shared) \
            if ctx.present else {}
    else:
        raise HFError(f"internal: moe has no reader for {ctx.family}")
    if top_k > experts:
        raise r.fail(f"num_experts_per_tok {top_k} > {key} {experts}")
    return dict(experts=experts, top_k=top_k, d_ff=ctx.shared["d_ff"], routing=routing)


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


def call(v: dict) -> str:
    """`moe(...)` from validated values (settings at their defaults left out)."""
    extra = ""
    if v.get("groups", 1) > 1:
        extra += f", groups = {num(v['groups'])}, top_groups = {num(v['top_groups'])}"
    if v.get("selection_bias"):
        extra += ", selection_bias = true"
    if v.get("routed_scale", 1.0) != 1.0:
        extra += f", routed_scale = {num(float(v['routed_scale']))}"
    extra += f", shared_d_ff = {num(v['shared_d_ff'])}" if v.get("shared_d_ff") else ""
    extra += ", shared_gate = true" if v.get("shared_gate") else ""
    return (f"moe(experts = {num(v['experts'])}, top_k = {num(v['top_k'])}, d_ff = {num(v['d_ff'])}, "
            f"act = {v.get('act', 'swiglu')}, routing = {v['routing']}{extra})")


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


def write(f, fam: str, d: int) -> dict:
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
    if fam == "mixtral":
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
    if fam == "qwen3_next":
        try:
            write(f, fam, 1)
        except HFError as e:
            return e.message
        return None
    if fam in ("llama", "mixtral", "jamba"):
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
    if site.family == "nemotron_h":
        return _nemotron_h_tensors(rest, site)
    if site.family == "granitemoehybrid":
        return _granite_tensors(rest, site)
    router, names = NAMES[site.family]
    module, fused = _layout(facet.modules[site.family], names[0], site)
    block = f"{site.block}{module}."
    if rest.startswith("router."):
        return Source((f"{block}{router}.{rest.split('.', 1)[1]}",))
    if site.family == "qwen3_next" and rest.startswith(("shared.", "shared_gate.")):
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


HF = HFFacet(name="moe", label="MoE", families=("mixtral", "jamba", "qwen3_next", "nemotron_h", "granitemoehybrid"),
             modules={"mixtral": ("block_sparse_moe", "mlp"), "jamba": ("feed_forward",), "qwen3_next": ("mlp",),
                      "nemotron_h": ("mixer",), "granitemoehybrid": ("block_sparse_moe", "shared_mlp")},
             read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors)
