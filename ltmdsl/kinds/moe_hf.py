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
from ltmdsl.hf.spec import num

#: family -> (router module inside the MoE block, per-expert gate / up / down names)
NAMES = {"mixtral": ("gate", ("w1", "w3", "w2")), "jamba": ("router", ("gate_proj", "up_proj", "down_proj")),
         "qwen3_next": ("gate", ("gate_proj", "up_proj", "down_proj")),
         "qwen3_moe": ("gate", ("gate_proj", "up_proj", "down_proj"))}
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
    else:
        raise HFError(f"internal: moe has no reader for {ctx.family}")
    if top_k > experts:
        raise r.fail(f"num_experts_per_tok {top_k} > {key} {experts}")
    return dict(experts=experts, top_k=top_k, d_ff=ctx.shared["d_ff"], routing=routing)


#: the activations a family's experts may have (identifiers that reach the spec text)
ACTIVATIONS = ("swiglu", "swiglu_clamped")


def call(v: dict) -> str:
    """`moe(...)` from validated values: act (default swiglu), gpt-oss's clamp numbers, biases, a shared expert
    (and its gate) and Llama-4's input weighting, each only when set."""
    act = v.get("act", "swiglu")
    if act not in ACTIVATIONS:
        raise HFError(f"internal: expert activation {act!r}")
    extra = "".join(f", {k} = {num(float(v[k]))}" for k in ("swiglu_limit", "swiglu_alpha") if v.get(k) is not None)
    extra += f", shared_d_ff = {num(v['shared_d_ff'])}" if v.get("shared_d_ff") else ""
    extra += "".join(f", {flag} = true" for flag in ("shared_gate", "router_bias", "expert_bias", "weight_input")
                     if v.get(flag))
    return (f"moe(experts = {num(v['experts'])}, top_k = {num(v['top_k'])}, d_ff = {num(v['d_ff'])}, act = {act}, "
            f"routing = {v['routing']}{extra})")


def write(f, fam: str, d: int) -> dict:
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


def tensors(facet: HFFacet, rest: str, site: Site) -> Source | None:
    if site.family in FUSED_T:
        return _fused_t(facet, rest, site)
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


HF = HFFacet(name="moe", label="MoE", families=("mixtral", "jamba", "qwen3_next"),
             modules={"mixtral": ("block_sparse_moe", "mlp"), "jamba": ("feed_forward",), "qwen3_next": ("mlp",),
                      "qwen3_moe": ("mlp",), "gpt_oss": ("mlp",), "llama4_text": ("feed_forward",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors)
