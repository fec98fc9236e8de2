"""Compute beside memory: FLOPs per decoded token at context T and FLOPs to prefill T tokens.

Counted per sequence, 2 FLOPs per multiply-add. Inference phases count the forward pass; the training
step counts forward + backward (2x forward) plus what recompute runs again: nothing (none), the
attention core (selective: Korthikanti et al. recompute the softmax block) or a whole forward (full).
Components:

    projections  2 * active parameters of every sub-layer per token (MoE: router + top-k experts;
                 norm and conv weights are included, a sub-1% overcount)
    head         2 * V * d per token (the output projection; the embedding lookup is free)
    attention    what each kind's `flops` facet (ltmdsl/kinds/<kind>.py) adds beyond its projections:
    ssm          attention: 2 * H * (D + Dv) * min(T, W) per decoded token, the causal sum over positions
                 when prefilling; Mamba-1/2: a recurrent step per decoded token, a scan (Mamba-1) or
                 chunked SSD (Mamba-2) when prefilling; nothing for feed-forward networks

So a dense-attention model's decode cost grows as O(T) and its prefill as O(T^2), while SSM layers
cost O(1) per token: this is the comparison behind Magic.dev's "1000x cheaper per decoded token".
"""

from __future__ import annotations

import sympy

from ltmdsl import kinds
from ltmdsl.ir import ModelIR
from ltmdsl.memory.symbols import T, ceil_bytes, compile_exact

FLOP_COMPONENTS = ("projections", "head", "attention", "ssm")

#: The FLOP quantities a budget's `require` may limit: (phase, components summed). `mixing_flops` is the
#: sequence-mixing part of a decoded token (what grows with the context, or stays O(1) in a recurrent layer);
#: `decode_flops` every FLOP of a decoded token; `prefill_flops` every FLOP of prefilling the context.
FLOP_QUANTITIES = {
    "decode_flops": ("per_token", FLOP_COMPONENTS),
    "mixing_flops": ("per_token", ("attention", "ssm")),
    "prefill_flops": ("prefill", FLOP_COMPONENTS),
}


def flops_exprs(model: ModelIR) -> dict[str, dict[str, sympy.Expr]]:
    """{"per_token": {component: expr}, "prefill": {component: expr}} as expressions in T."""
    d = model.d_model
    counts: dict = {}
    proj = 0
    for layer in model.layers:
        counts[layer.mixer] = counts.get(layer.mixer, 0) + 1
        m = layer.mixer
        proj += 2 * (layer.params - kinds.kind_of(m).inactive(m, d))
    head = 2 * model.vocab * d
    per_token = {"projections": sympy.Integer(proj), "head": sympy.Integer(head),
                 "attention": sympy.Integer(0), "ssm": sympy.Integer(0)}
    prefill = {"projections": proj * T, "head": head * T, "attention": sympy.Integer(0), "ssm": sympy.Integer(0)}
    for m, n in counts.items():
        kind = kinds.kind_of(m)
        for component, f in kind.flops(m).items():
            if component not in ("attention", "ssm"):
                raise ValueError(f"layer kind '{kind.name}' reports FLOPs for unknown component '{component}' "
                                 f"(components: {', '.join(FLOP_COMPONENTS[2:])})")
            per_token[component] += n * f.per_token
            prefill[component] += n * f.prefill
    return {"per_token": per_token, "prefill": prefill}


def training_step(prefill: dict[str, int], recompute: str) -> dict[str, int]:
    """FLOPs of one training step on one sequence, per component, from its forward (prefill) FLOPs."""
    extra = {"none": dict.fromkeys(prefill, 0), "full": dict(prefill),
             "selective": {k: (v if k == "attention" else 0) for k, v in prefill.items()}}[recompute]
    return {k: 3 * v + extra[k] for k, v in prefill.items()}


def flops(model: ModelIR, context: int, recompute: str = "none") -> dict:
    """Exact FLOP counts at `context`: per_token / prefill / training_step component dicts and totals."""
    out: dict = {}
    for phase, comps in flops_exprs(model).items():
        values = {k: ceil_bytes(compile_exact(e)(context, 1, 1)) for k, e in comps.items()}
        out[phase] = values
        out[f"{phase}_total"] = sum(values.values())
    out["training_step"] = training_step(out["prefill"], recompute)
    out["training_step_total"] = sum(out["training_step"].values())
    out["recompute"] = recompute
    return out


class FlopQuantities:
    """`value(name, T)`: a FLOP quantity of FLOP_QUANTITIES at context T, exactly as `flops()` counts it (each
    component rounded up, then summed), for budget limits and for solving the largest context under one."""

    def __init__(self, model: ModelIR):
        exprs = flops_exprs(model)
        self._fns = {(phase, c): compile_exact(e) for phase, comps in exprs.items() for c, e in comps.items()}

    def value(self, name: str, context: int) -> int:
        phase, components = FLOP_QUANTITIES[name]
        return sum(ceil_bytes(self._fns[phase, c](context, 1, 1)) for c in components)
