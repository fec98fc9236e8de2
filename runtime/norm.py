"""The pre-norm of each sub-layer and the final norm: RMSNorm or LayerNorm fused with the residual add.

Parameter names: `weight` [d] (and `bias` [d] for layernorm), as docs/CONTRACTS.md lists them.
"""

from __future__ import annotations

import torch
from torch import nn

from ltmdsl.ir import NormConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.kernels import Kernels
from ltmdsl.runtime.ops_norm import add_layernorm, rmsnorm


class Norm(nn.Module):
    """residual add + norm: forward(x [..., d], residual [..., d] | None) -> (normed, summed)."""

    def __init__(self, cfg: NormConfig, d: int, kernels: Kernels):
        super().__init__()
        self.kind, self.eps, self.kernels = cfg.kind, cfg.eps, kernels
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if cfg.kind == "layernorm" else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.kind == "rmsnorm":
            return self.kernels.add_rmsnorm(x, residual, self.weight, eps=self.eps)
        return add_layernorm(x, residual, self.weight, self.bias, eps=self.eps)

    def init_weights(self, gen: torch.Generator) -> None:
        init.ones_(self.weight)
        init.zeros_(self.bias)


class RMSNorm(nn.Module):
    """A plain RMSNorm over the last axis (Qwen3's q/k norms, Jamba's dt/B/C norms)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)

    def init_weights(self, gen: torch.Generator) -> None:
        init.ones_(self.weight)
