"""The pre-norm of each sub-layer and the final norm: RMSNorm or LayerNorm fused with the residual add.

Parameter names: `weight` [d] (and `bias` [d] for layernorm), as docs/CONTRACTS.md lists them. A zero-centred
RMSNorm (Gemma, Qwen3-Next: NormConfig.zero_centred) stores w centred on zero, initialised to 0, and scales by
(1 + w), computed in the weight's dtype.
`OPS` declares the kernel op the norms call through the kernels bundle (add_rmsnorm; LayerNorm runs its
PyTorch op directly), the way each runtime kind declares its own (runtime/kernels.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ltmdsl.ir import NormConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_norm
from ltmdsl.runtime.ops_norm import add_layernorm, rmsnorm

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels

#: The kernel ops the norms call through the bundle (op name -> PyTorch reference).
OPS = {"add_rmsnorm": ops_norm.add_rmsnorm}
#: Norm kind -> whether it has a `bias` (rmsnorm runs the add_rmsnorm op; layernorm its PyTorch op).
HAS_BIAS = {"rmsnorm": False, "layernorm": True}


class Norm(nn.Module):
    """residual add + norm: forward(x [..., d], residual [..., d] | None) -> (normed, summed)."""

    def __init__(self, cfg: NormConfig, d: int, kernels: "Kernels"):
        super().__init__()
        if cfg.kind not in HAS_BIAS:
            raise ValueError(f"no runtime norm {cfg.kind!r}; expected one of {sorted(HAS_BIAS)}")
        if cfg.zero_centred and cfg.kind != "rmsnorm":
            raise ValueError(f"zero_centred is an rmsnorm setting, not {cfg.kind!r}")
        self.kind, self.eps, self.kernels = cfg.kind, cfg.eps, kernels
        self.zero_centred = cfg.zero_centred
        self.weight = nn.Parameter(torch.zeros(d) if cfg.zero_centred else torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if HAS_BIAS[cfg.kind] else None
        # The tp process group when the tokens are sequence-parallel (ltmdsl.distributed.sequence_parallel):
        # each rank's tokens give part of the parameters' gradient, summed over the group in backward.
        self.sequence_parallel = None

    def _param(self, p: torch.Tensor) -> torch.Tensor:
        """A parameter as the forward reads it: itself, or under sequence parallelism the same values whose
        gradient is summed over the tp ranks."""
        if self.sequence_parallel is None:
            return p
        from ltmdsl.runtime.tensor_parallel import copy_to_tp

        return copy_to_tp(p, self.sequence_parallel)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        w = self._param(self.weight)  # [d]
        if self.bias is None:  # rmsnorm (HAS_BIAS)
            weight = 1 + w if self.zero_centred else w  # [d]
            return self.kernels.add_rmsnorm(x, residual, weight, eps=self.eps)
        return add_layernorm(x, residual, w, self._param(self.bias), eps=self.eps)

    def init_weights(self, gen: torch.Generator) -> None:
        (init.zeros_ if self.zero_centred else init.ones_)(self.weight)
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
