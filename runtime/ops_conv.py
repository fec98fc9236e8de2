"""Depthwise causal 1-D convolution, the short conv in front of every Mamba scan.

    causal_conv1d(x [B,T,C], weight [C,K], bias [C]|None, *, prev [B,C,K-1]|None, silu) -> y [B,T,C]
    conv_step(x [B,C], state [B,C,K], weight [C,K], bias [C]|None, *, silu) -> y [B,C]   (state in place)

y[t, c] = bias[c] + sum_j weight[c, j] * x_ext[t + j, c] over the K taps ending at t, where x_ext is
`prev` followed by x. Mirrors transformers' causal_conv1d_fn / causal_conv1d_update (F.conv1d, groups=C).
`causal_conv1d_reference` is the tap-loop oracle of both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    prev: torch.Tensor | None,
    silu: bool,
) -> torch.Tensor:
    """Depthwise causal conv over the sequence: x [B,T,C] with K taps -> [B,T,C] (see module docstring)."""
    B, T, C = x.shape
    K = weight.shape[1]
    xc = x.transpose(1, 2)  # [B, C, T]
    if prev is None:
        xc = F.pad(xc, (K - 1, 0))  # [B, C, K-1+T]
    else:
        xc = torch.cat([prev.to(x.dtype), xc], dim=-1)  # [B, C, K-1+T]
    y = F.conv1d(xc, weight.unsqueeze(1), bias, groups=C)  # [B, C, T]
    if silu:
        y = F.silu(y)
    return y.transpose(1, 2)  # [B, T, C]


def conv_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, silu: bool
) -> torch.Tensor:
    """One decode step: shift `state` [B,C,K] left, write x [B,C] last, return the K-tap conv [B,C].

    `state` is updated in place (its dtype may differ from x: the cache's state dtype).
    """
    state.copy_(torch.roll(state, shifts=-1, dims=-1))
    state[:, :, -1] = x
    y = (state.to(weight.dtype) * weight[None]).sum(-1)  # [B, C]
    if bias is not None:
        y = y + bias
    return F.silu(y) if silu else y


def causal_conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, prev: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """Oracle of `causal_conv1d` and `conv_step`: an explicit loop over the K taps."""
    B, T, C = x.shape
    K = weight.shape[1]
    before = torch.zeros(B, K - 1, C, dtype=x.dtype) if prev is None else prev.transpose(1, 2).to(x.dtype)
    ext = torch.cat([before, x], dim=1)  # [B, K-1+T, C]
    y = torch.zeros_like(x)
    for j in range(K):
        y = y + ext[:, j : j + T] * weight[:, j]  # [B, T, C]
    if bias is not None:
        y = y + bias
    return F.silu(y) if silu else y
