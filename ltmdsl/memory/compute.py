"""Compute beside memory: FLOPs per decoded token at context T and FLOPs to prefill T tokens.

Counted per sequence, 2 FLOPs per multiply-add. Inference phases count the forward pass; the training
step counts forward + backward (2x forward) plus what recompute runs again: nothing (none), the
attention core (selective: Korthikanti et al. recompute the softmax block) or a whole forward (full).
Components:

    projections  2 * active parameters of every sub-layer per token (MoE: router + top-k experts;
                 norm and conv weights are included, a sub-1% overcount)
    head         2 * V * d per token (the output projection; the embedding lookup is free)
    attention    decode: 2 * H * (D + Dv) * min(T, W) per attention sub-layer (q.k and p.v over the
                 cached keys); prefill: the causal sum over positions i = 1..T of 2*H*(D+Dv)*min(i, W)
                 = 2*H*(D+Dv) * (m(m+1)/2 + (T - m)*W) with m = min(T, W) (T(T+1)/2 when global)
    ssm          decode (recurrent step): 6 * Di * N (discretise, update, read out) + 2 * conv_dim * K;
                 prefill: Mamba-1 scans token by token (T x decode); Mamba-2 runs SSD in chunks of
                 L = min(chunk, T): per token 2L*G*N (C.B^T) + 2L*Hs*P (masked mixing) + 4*Hs*P*N
                 (chunk states and their read-out) + the conv

So a dense-attention model's decode cost grows as O(T) and its prefill as O(T^2), while SSM layers
cost O(1) per token: this is the comparison behind Magic.dev's "1000x cheaper per decoded token".
"""

from __future__ import annotations

import sympy

from ltmdsl.ir import AttentionConfig, Mamba2Config, MambaConfig, ModelIR, MoEConfig
from ltmdsl.memory.symbols import T, ceil_bytes, compile_exact

FLOP_COMPONENTS = ("projections", "head", "attention", "ssm")


def _causal_sum(window: int | None):
    """sum_{i=1..T} min(i, W): T(T+1)/2 for global attention, piecewise-exact via Min otherwise."""
    if window is None:
        return T * (T + 1) / 2
    m = sympy.Min(T, window)
    return m * (m + 1) / 2 + (T - m) * window


def _ssm_step(m) -> int:
    if isinstance(m, MambaConfig):
        return 6 * m.d_inner * m.d_state + 2 * m.d_inner * m.d_conv
    return 6 * m.heads * m.head_dim * m.d_state + 2 * m.conv_dim * m.d_conv


def flops_exprs(model: ModelIR) -> dict[str, dict[str, sympy.Expr]]:
    """{"per_token": {component: expr}, "prefill": {component: expr}} as expressions in T."""
    d = model.d_model
    counts: dict = {}
    proj = 0
    for layer in model.layers:
        counts[layer.mixer] = counts.get(layer.mixer, 0) + 1
        m = layer.mixer
        active = layer.params - (m.inactive_params(d) if isinstance(m, MoEConfig) else 0)
        proj += 2 * active
    head = 2 * model.vocab * d
    att_tok, att_pre, ssm_tok, ssm_pre = (sympy.Integer(0),) * 4
    for m, n in counts.items():
        if isinstance(m, AttentionConfig):
            width = 2 * m.heads * (m.head_dim + m.v_head_dim)
            held = T if m.window is None else sympy.Min(T, m.window)
            att_tok += n * width * held
            att_pre += n * width * _causal_sum(m.window)
        elif isinstance(m, MambaConfig):
            ssm_tok += n * _ssm_step(m)
            ssm_pre += n * _ssm_step(m) * T
        elif isinstance(m, Mamba2Config):
            ssm_tok += n * _ssm_step(m)
            L = sympy.Min(m.chunk, T)
            per_tok = (2 * L * m.n_groups * m.d_state + 2 * L * m.heads * m.head_dim
                       + 4 * m.heads * m.head_dim * m.d_state + 2 * m.conv_dim * m.d_conv)
            ssm_pre += n * per_tok * T
    return {
        "per_token": {"projections": sympy.Integer(proj), "head": sympy.Integer(head),
                      "attention": att_tok, "ssm": ssm_tok},
        "prefill": {"projections": proj * T, "head": head * T, "attention": att_pre, "ssm": ssm_pre},
    }


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
