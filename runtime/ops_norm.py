"""Normalisation ops: RMSNorm (computed in fp32, as Hugging Face does) and LayerNorm.

`add_rmsnorm` fuses the residual add with the norm that follows it, the shape of the kernel the Triton back
end supplies; `rmsnorm` is the plain form used inside layers (Qwen3 q/k norms, Jamba's dt/B/C norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., d] -> weight * x / sqrt(mean(x^2) + eps) [..., d].

    Mirrors transformers' LlamaRMSNorm: statistics in fp32 (fp64 stays fp64), the normalised value cast
    back to the input dtype before the weight multiplies it.
    """
    dtype = x.dtype
    xf = x.float() if dtype != torch.float64 else x  # [..., d]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, *, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: x [..., d], residual [..., d] | None -> (normed, summed).

    summed = x + residual (x alone when residual is None); normed = rmsnorm(summed) * weight.
    The Triton back end's fused kernel has this signature (docs/CONTRACTS.md).
    """
    summed = x if residual is None else x + residual  # [..., d]
    return rmsnorm(summed, weight, eps), summed


def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, *, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then LayerNorm (statistics in fp32): same contract as `add_rmsnorm`, plus a bias."""
    summed = x if residual is None else x + residual  # [..., d]
    dtype = summed.dtype
    work = summed if dtype == torch.float64 else summed.float()
    normed = F.layer_norm(work, (work.shape[-1],), weight.to(work.dtype), bias.to(work.dtype), eps)
    return normed.to(dtype), summed


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, *, group_size: int, eps: float):
    """Mamba-2's output norm: rmsnorm(y * silu(z)) per group of `group_size` channels, times weight.

    y, z [..., Di] -> [..., Di]; mirrors transformers' MambaRMSNormGated (norm_before_gate=False).
    """
    dtype = y.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    h = y.to(work) * F.silu(z.to(work))  # [..., Di]
    *lead, Di = h.shape
    hg = h.view(*lead, Di // group_size, group_size)  # [..., G, Di/G]
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hg.view(*lead, Di).to(dtype)
