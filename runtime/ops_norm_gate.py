"""The norm-then-gate RMSNorm of the delta-rule layers, a block of tokens at a time, saving only its inputs.

    y = weight * rmsnorm(o) * act(gate)        over the last axis (each head's Dv), statistics in fp32

Qwen3-Next's Qwen3NextRMSNormGated (act = silu) and Kimi-Linear's KimiLinearRMSNormGated (act = sigmoid): the
norm comes before the gate (Mamba-2's gated norm, ops_norm.gated_rmsnorm, gates first). Written out in eager
PyTorch (`norm_then_gate_reference`) autograd would keep five fp32 copies of o's size for backward; a fused
kernel (flash-linear-attention's FusedRMSNormGated) keeps o, the gate and the fp32 rstd and writes y in the
input dtype. `norm_then_gate` does that: `NormThenGate` computes y `block` tokens at a time into one output
(fp32 temporaries of one block only) and saves o, gate, weight and rstd [..., 1]; its backward is analytic and
runs block by block too, with n = o * rstd and a = act(gate):
    dgate = dy * weight * n * act'(gate)     dweight = sum(dy * n * a)
    do    = rstd * (dn - n * mean(dn * n))   with dn = dy * weight * a
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Act = Callable[[torch.Tensor], torch.Tensor]


def _work(t: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (the oracle precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_act(act: Act) -> None:
    """The Function differentiates the two gates the delta-rule layers use: silu and sigmoid."""
    if act is not F.silu and act is not torch.sigmoid:
        raise ValueError(f"norm_then_gate: no derivative for the gate activation {act!r} (F.silu or torch.sigmoid)")


def _act_grad(act: Act, z: torch.Tensor) -> torch.Tensor:
    """act'(z) for silu or sigmoid."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s)) if act is F.silu else s * (1 - s)


def _forward(o, gate, weight, eps: float, act: Act, block: int, rstd: torch.Tensor | None) -> torch.Tensor:
    """y [B, T, ..., Dv] in o's dtype, `block` tokens (dim 1) at a time; writes rstd [B, T, ..., 1] if given."""
    work = _work(o)
    w = weight.to(work)  # [Dv]
    y = torch.empty_like(o)  # [B, T, ..., Dv]
    for lo in range(0, o.shape[1], block):
        part = slice(lo, lo + block)
        x = o[:, part].to(work, copy=True)  # [B, n, ..., Dv]   a copy: scaled in place below
        r = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # [B, n, ..., 1]
        if rstd is not None:
            rstd[:, part] = r
        x.mul_(r).mul_(w)
        x.mul_(act(gate[:, part].to(work)))
        y[:, part] = x
        del x, r
    return y


class NormThenGate(torch.autograd.Function):
    """weight * rmsnorm(o) * act(gate), saving o, gate, weight and the fp32 rstd (module docstring)."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, act: Act, block: int):
        rstd = torch.empty(*o.shape[:-1], 1, dtype=_work(o), device=o.device)  # [B, T, ..., 1]
        y = _forward(o, gate, weight, eps, act, block, rstd)
        ctx.act, ctx.block = act, block
        ctx.save_for_backward(o, gate, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        o, gate, weight, rstd = ctx.saved_tensors
        work, act = rstd.dtype, ctx.act
        w = weight.to(work)  # [Dv]
        do, dgate = torch.empty_like(o), torch.empty_like(gate)  # [B, T, ..., Dv]
        dweight = torch.zeros_like(w)  # [Dv]
        for lo in range(0, o.shape[1], ctx.block):  # the fp32 terms of one block at a time
            part = slice(lo, lo + ctx.block)
            r, z, g = rstd[:, part], gate[:, part].to(work), dy[:, part].to(work, copy=True)  # [B, n, ..., 1 | Dv]
            n = o[:, part].to(work) * r  # [B, n, ..., Dv]   the normalised input
            dgate[:, part] = g * w * n * _act_grad(act, z)
            a = act(z)
            dweight += (g * n * a).flatten(0, -2).sum(0)
            dn = g.mul_(w).mul_(a)  # dy * weight * act(gate), in dy's block copy
            do[:, part] = r * (dn - n * (dn * n).mean(-1, keepdim=True))
        return do, dgate, dweight.to(weight.dtype), None, None, None


def norm_then_gate(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, act: Act, *,
                   block: int) -> torch.Tensor:
    """o, gate [B, T, ..., Dv], weight [Dv] -> weight * rmsnorm(o) * act(gate) [B, T, ..., Dv] in o's dtype,
    `block` tokens at a time; under autograd through `NormThenGate`. act: F.silu or torch.sigmoid.
    Oracle: `norm_then_gate_reference`."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (o, gate, weight)):
        _check_act(act)
        return NormThenGate.apply(o, gate, weight, eps, act, block)
    return _forward(o, gate, weight, eps, act, block, None)


def norm_then_gate_reference(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                             act: Act) -> torch.Tensor:
    """The plain form (autograd differentiates it): statistics in fp32 (fp64 stays), y in o's dtype."""
    work = _work(o)
    of = o.to(work)
    of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)  # [..., Dv]
    return (weight.to(work) * of * act(gate.to(work))).to(o.dtype)
