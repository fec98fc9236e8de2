"""The Hugging Face facet of parallel (see ltmdsl.hf.facet): Falcon-H1's decoder layer, attention beside Mamba-2.

Falcon-H1 (falcon_h1) keeps branch a, the attention, under `self_attn` (q/k/v/o_proj as the runtime names them)
and branch b, the Mamba-2 mixer, under `mamba` (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj); its family
module (ltmdsl/hf/families/falcon_h1.py) reads and writes the config, including the branches' multipliers, so
`read` is not used and `write` holds only what every Falcon-H1 layer must share.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext, Site, Source
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num

#: runtime branch -> Falcon-H1's module
BRANCH_MODULES = {"a": "self_attn", "b": "mamba"}


def read(r: Reader, ctx: ReadContext) -> dict:
    raise HFError(f"internal: {ctx.family} reads its parallel layers in its family module")


def call(v: dict) -> str:
    """`parallel(a = <name>, b = <name>, ...)`: the branch definition names and the multipliers off 1."""
    scales = "".join(f", {k} = {num(float(v[k]))}" for k in ("a_in", "b_in", "a_out", "b_out")
                     if v.get(k, 1.0) != 1.0)
    return f"parallel(a = {v['a']}, b = {v['b']}{scales})"


def misfit(p, fam: str) -> str | None:
    if fam != "falcon_h1":
        return f"{fam} has no parallel layers"
    if p.a.kind != "attention" or p.b.kind != "mamba2":
        return f"Falcon-H1's parallel layers are attention (a) beside Mamba-2 (b), not {p.a.kind} beside {p.b.kind}"
    return None


def write(p, fam: str, d: int) -> dict:
    why = misfit(p, fam)
    if why:
        raise HFError(why)
    return {"attention_in_multiplier": p.a_in, "attention_out_multiplier": p.a_out, "ssm_in_multiplier": p.b_in,
            "ssm_out_multiplier": p.b_out}


def traits(p) -> frozenset[str]:
    return frozenset({"parallel"})


def tensors(facet: HFFacet, rest: str, site: Site) -> Source:
    """`a.<name>` under self_attn, `b.<name>` under mamba (anything else keeps its name under the layer)."""
    branch, _, tail = rest.partition(".")
    module = BRANCH_MODULES.get(branch)
    return Source((f"{site.block}{module}.{tail}" if module else f"{site.block}{rest}",))


HF = HFFacet(name="parallel", label="parallel", families=("falcon_h1",), modules={"falcon_h1": ("self_attn", "mamba")},
             read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors)
