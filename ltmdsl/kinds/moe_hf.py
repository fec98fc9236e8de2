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
         "qwen3_next": ("gate", ("gate_proj", "up_proj", "down_proj")), "minimax": ("gate", ("w1", "w3", "w2"))}
_WHICH = {"experts.gate_proj": 0, "experts.up_proj": 1, "experts.down_proj": 2}


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family in ("mixtral", "minimax"):
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


def call(v: dict) -> str:
    shared = f", shared_d_ff = {num(v['shared_d_ff'])}" if v.get("shared_d_ff") else ""
    shared += ", shared_gate = true" if v.get("shared_gate") else ""
    return (f"moe(experts = {num(v['experts'])}, top_k = {num(v['top_k'])}, d_ff = {num(v['d_ff'])}, act = swiglu, "
            f"routing = {v['routing']}{shared})")


def write(f, fam: str, d: int) -> dict:
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
    if fam == "qwen3_next":
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


def tensors(facet: HFFacet, rest: str, site: Site) -> Source | None:
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


HF = HFFacet(name="moe", label="MoE", families=("mixtral", "jamba", "qwen3_next", "minimax"),
             modules={"mixtral": ("block_sparse_moe", "mlp"), "jamba": ("feed_forward",), "qwen3_next": ("mlp",),
                      "minimax": ("block_sparse_moe", "mlp")},
             read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors)
