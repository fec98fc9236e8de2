"""LFM2's gated short convolution sub-layer, as transformers' Lfm2ShortConv computes it.

    Bg, Cg, x = in_proj(u).chunk(3)      [B,T,d] each
    y = Cg * causal_conv_L(Bg * x)       depthwise, L = kernel taps, no activation
    out_proj(y) -> [B,T,d]

With a cache the last conv inputs (Bg * x) carry over; `step` is the one-token form. The state is the
conv taps alone, [B, d, L] ("full", as transformers' cache keeps them) or [B, d, L-1] ("minus_one").

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, its `ConvState` allocation, the kernel
ops it calls (causal_conv1d, conv_step) and its parameter names (transformers': in_proj, conv, out_proj).
`ConvState` and `conv_with_taps` / `conv_step_with_taps` are shared with the RG-LRU block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ltmdsl.kinds.short_conv import ShortConvConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_conv
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.tensor_parallel import local, segmented, shard_parameters
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, cp_passed, no_loops

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


@dataclass
class ConvState(LayerCache):
    """The conv taps of a short convolution: conv [B, C, L or L-1] in the state dtype."""

    component: ClassVar[str] = "recurrent_state"
    conv: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.conv,)


def taps_for(kernel: int, req: CacheRequest) -> int:
    """Cached conv inputs: L ("full") or L-1 ("minus_one")."""
    return kernel if req.conv_taps == "full" else kernel - 1


def new_cache(cfg: ShortConvConfig, req: CacheRequest) -> ConvState:
    """Zeroed conv taps [B, d, taps] in the state dtype (d / t channels on a tensor-parallel rank)."""
    width = req.per_rank(cfg.width, "channels")
    conv = torch.zeros(req.batch_size, width, taps_for(cfg.kernel, req), dtype=req.state_dtype,
                       device=req.device)  # [B, d, taps]
    return ConvState(conv)


def outputs(cfg: ShortConvConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): out_proj reads the gated convolution, no norm."""
    return {"out_proj.weight": False}


def state_names(cfg: ShortConvConfig) -> tuple[str, ...]:
    """The parameters a `ShortConv` owns (transformers' Lfm2ShortConv names)."""
    names = ["in_proj.weight", "conv.weight", "out_proj.weight"]
    if cfg.bias:
        names += ["in_proj.bias", "conv.bias", "out_proj.bias"]
    return tuple(names)


def conv_with_taps(kernels: "Kernels", x: torch.Tensor, conv: nn.Conv1d, taps: torch.Tensor | None,
                   *, silu: bool) -> torch.Tensor:
    """Causal depthwise conv of x [B,T,C] continuing from the cached `taps` [B,C,n] (None: from zeros),
    leaving the newest n inputs there (in place)."""
    if x.shape[1] == 0:  # an empty prefill leaves the taps as they were
        return x.clone()
    K = conv.weight.shape[-1]
    prev = None
    if taps is not None and K > 1:
        prev = taps[:, :, -(K - 1):]  # [B, C, K-1]: the K-1 inputs before x
    y = kernels.causal_conv1d(x, local(conv.weight)[:, 0], local(conv.bias), prev=prev, silu=silu)  # [B, T, C]
    if taps is not None and taps.shape[-1]:
        n = taps.shape[-1]
        taps.copy_(torch.cat([taps, x.transpose(1, 2).to(taps.dtype)], dim=-1)[..., -n:])
    return y


def conv_step_with_taps(kernels: "Kernels", x: torch.Tensor, conv: nn.Conv1d, taps: torch.Tensor,
                        *, silu: bool) -> torch.Tensor:
    """One token x [B,C] -> conv [B,C]: K cached taps use the in-place `conv_step` kernel, K-1 taps
    convolve [taps ; x] and shift."""
    if taps.shape[-1] == conv.weight.shape[-1]:
        return kernels.conv_step(x, taps, local(conv.weight)[:, 0], local(conv.bias), silu=silu)
    return conv_with_taps(kernels, x[:, None], conv, taps, silu=silu)[:, 0]


class ShortConv(nn.Module):
    """forward(u [B,T,d], state: ConvState | None, pos0) -> [B,T,d]; step(u [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: ShortConvConfig, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        W, L = cfg.width, cfg.kernel
        self.in_proj = nn.Linear(d, 3 * W, bias=cfg.bias)
        self.conv = nn.Conv1d(W, W, L, groups=W, padding=L - 1, bias=cfg.bias)  # weight [W, 1, L]
        self.out_proj = nn.Linear(W, d, bias=cfg.bias)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Projections normal(0, 0.02) as every linear here; conv uniform in +-1/sqrt(L) (PyTorch's fan-in
        bound for a depthwise conv); biases zero."""
        init.linear_(self.in_proj, gen)
        init.uniform_(self.conv.weight, gen, 1.0 / math.sqrt(self.cfg.kernel))
        init.zeros_(self.conv.bias)
        init.linear_(self.out_proj, gen)

    def forward(self, u: torch.Tensor, state: ConvState | None = None, pos0: int = 0) -> torch.Tensor:
        Bg, Cg, x = self.in_proj(u).chunk(3, dim=-1)  # [B, T, d] each
        y = conv_with_taps(self.kernels, Bg * x, self.conv, None if state is None else state.conv, silu=False)
        return self.out_proj(Cg * y)  # [B, T, d]

    def step(self, u: torch.Tensor, state: ConvState, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing the conv taps in place."""
        Bg, Cg, x = self.in_proj(u).chunk(3, dim=-1)  # [B, d] each
        y = conv_step_with_taps(self.kernels, Bg * x, self.conv, state.conv, silu=False)  # [B, d]
        return self.out_proj(Cg * y)


def cp_forward(module: ShortConv, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's tokens u [B, T/cp, d]: the gated input's causal conv takes the previous
    rank's last L-1 gated inputs as its halo (`cp.causal_conv`); everything else is token-local."""
    Bg, Cg, x = module.in_proj(u).chunk(3, dim=-1)  # [B, T, W] each
    bx = Bg * x  # [B, T, W]
    y = cp.causal_conv(module.kernels, bx, module.conv, silu=False)  # [B, T, W]: the previous rank's halo first
    return module.out_proj(Cg * y)  # [B, T, d]


def tp_plan(cfg: ShortConvConfig, tp: int) -> dict:
    """Channels split over tp: in_proj column-wise by segments (B, C and x each by channels: `segmented`),
    the depthwise conv's channels with them, out_proj row-wise (one all-reduce; its bias replicated).
    Every channel's gate and conv are its own, so nothing else crosses ranks."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    W = cfg.width
    if W % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the short_conv's {W} channels")
    return {"in_proj": segmented(ColwiseParallel(), {"weight": (W, W, W), "bias": (W, W, W)}),
            "conv": shard_parameters(0), "out_proj": RowwiseParallel()}


KIND = RuntimeKind(
    name="short_conv",
    module=ShortConv,
    build=ShortConv,
    new_cache=new_cache,
    ops={"causal_conv1d": ops_conv.causal_conv1d, "conv_step": ops_conv.conv_step},
    oracles={"causal_conv1d": ops_conv.causal_conv1d_reference},
    state_names=state_names,
    outputs=outputs,
    trace_loops=no_loops,
    cp_inference=cp_passed,
    cp_forward=cp_forward,
    tp_plan=tp_plan,
)
