"""Mamba-2 SSD sub-layer (Dao & Gu 2024), as transformers' Mamba2Mixer computes it.

    z, xBC, dt = in_proj(u).split([Di, Di + 2GN, Hs])
    xBC = silu(causal_conv1d(xBC));  x, Bm, Cm = xBC.split([Di, GN, GN])
    dt = softplus(dt + dt_bias) [B,T,Hs];  A = -exp(A_log) [Hs]
    y = ssd_scan(x [B,T,Hs,P], dt, A, Bm [B,T,G,N], Cm) + D * x
    y = rmsnorm_grouped(y * silu(z)) * norm.weight   (group size Di / G);  out_proj(y) -> [B,T,d]

With a cache the conv taps and the SSM state [B,Hs,P,N] carry over; `step` is the one-token recurrence.

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, its `ConvSSMState` allocation (conv taps
[B, Di + 2GN, K or K-1], SSM state [B, Hs, P, N]; the state class and conv helpers are Mamba-1's), the
kernel ops it calls (causal_conv1d, conv_step, ssd_scan, ssd_step) and its parameter names.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.mamba2 import Mamba2Config
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_conv, ops_ssd
from ltmdsl.runtime.cache import CacheRequest
from ltmdsl.runtime.chunk_recompute import recompute
from ltmdsl.runtime.kinds import RuntimeKind
from ltmdsl.runtime.kinds.mamba import ConvSSMState, conv_step_with_state, conv_taps, conv_with_state
from ltmdsl.runtime.ops_norm import gated_rmsnorm

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


def new_cache(cfg: Mamba2Config, req: CacheRequest) -> ConvSSMState:
    """Zeroed conv taps [B, Di + 2GN, taps] and SSM state [B, Hs, P, N] in the state dtype."""
    B, dt, dev = req.batch_size, req.state_dtype, req.device
    conv = torch.zeros(B, cfg.conv_dim, conv_taps(cfg.d_conv, req), dtype=dt, device=dev)  # [B, C, taps]
    ssm = torch.zeros(B, cfg.heads, cfg.head_dim, cfg.d_state, dtype=dt, device=dev)  # [B, Hs, P, N]
    return ConvSSMState(conv, ssm)


def state_names(cfg: Mamba2Config) -> tuple[str, ...]:
    """The parameters a `Mamba2` owns (transformers' Mamba2Mixer names)."""
    names = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "out_proj.weight"]
    if cfg.gated_norm:
        names.append("norm.weight")
    if cfg.proj_bias:
        names += ["in_proj.bias", "out_proj.bias"]
    if cfg.conv_bias:
        names.append("conv1d.bias")
    return tuple(names)


def _ssd_scan_oracle(x, dt, A, Bm, Cm, *, chunk, state):
    """The token-loop SSD oracle behind the chunked op's signature (the oracle has no chunk length)."""
    return ops_ssd.ssd_scan_reference(x, dt, A, Bm, Cm, state=state)


class GatedNormWeight(nn.Module):
    """Holds `norm.weight` [Di] of the gated RMSNorm (the math lives in ops_norm.gated_rmsnorm)."""

    def __init__(self, Di: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(Di))


class Mamba2(nn.Module):
    """forward(x [B,T,d], state: ConvSSMState | None, pos0) -> [B,T,d]; step(x [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: Mamba2Config, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg, self.kernels, self.eps = cfg, kernels, eps
        Di, Hs, K = cfg.d_inner, cfg.heads, cfg.d_conv
        self.in_proj = nn.Linear(d, 2 * Di + 2 * cfg.n_groups * cfg.d_state + Hs, bias=cfg.proj_bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, K, groups=cfg.conv_dim, padding=K - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(Hs))
        self.A_log = nn.Parameter(torch.empty(Hs))
        self.D = nn.Parameter(torch.empty(Hs))
        self.norm = GatedNormWeight(Di) if cfg.gated_norm else None
        self.out_proj = nn.Linear(Di, d, bias=cfg.proj_bias)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Like state-spaces/mamba's Mamba2: A uniform in [1, 16], D = 1, dt log-uniform in [1e-3, 0.1]."""
        cfg = self.cfg
        init.linear_(self.in_proj, gen)
        init.uniform_(self.conv1d.weight, gen, 1.0 / math.sqrt(cfg.d_conv))
        init.zeros_(self.conv1d.bias)
        init.dt_bias_(self.dt_bias, gen)
        init.assign_(self.A_log, torch.log(1 + 15 * torch.rand(cfg.heads, generator=gen)))
        init.ones_(self.D)
        if self.norm is not None:
            init.ones_(self.norm.weight)
        init.linear_(self.out_proj, gen)

    def _split(self, zxbcdt: torch.Tensor):
        cfg = self.cfg
        GN = cfg.n_groups * cfg.d_state
        return zxbcdt.split([cfg.d_inner, cfg.d_inner + 2 * GN, cfg.heads], dim=-1)

    @staticmethod
    def _dt_A_of(dt: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor):
        """dt [..., Hs] -> softplus(dt + dt_bias) and A = -exp(A_log), in fp32 (fp64 for fp64 inputs)."""
        work = torch.float64 if dt.dtype == torch.float64 else torch.float32
        return F.softplus(dt.to(work) + dt_bias.to(work)), -torch.exp(A_log.to(work))

    def _dt_A(self, dt: torch.Tensor):
        return self._dt_A_of(dt, self.dt_bias, self.A_log)

    def _gated(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor,
               norm_weight: torch.Tensor | None) -> torch.Tensor:
        """y, x [..., Hs, P], z [..., Di] -> gated_norm(y + D x, z) [..., Di] in x's dtype (without the norm:
        (y + D x) * silu(z))."""
        cfg = self.cfg
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = y.to(work) + x.to(work) * D.to(work)[:, None]  # [..., Hs, P]
        y = y.reshape(*y.shape[:-2], cfg.d_inner)  # [..., Di]
        if norm_weight is None:  # gated_norm = false (Falcon-H1's mamba_rms_norm false): the gate alone
            y = y * F.silu(z.to(work))  # [..., Di]
        else:
            y = gated_rmsnorm(y, z, norm_weight.to(work), group_size=cfg.d_inner // cfg.n_groups, eps=self.eps)
        return y.to(x.dtype)

    def _finish(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, x [..., Hs, P], z [..., Di] -> out_proj(gated_norm(y + D x, z)) [..., d]."""
        return self.out_proj(self._gated(y, x, z, self.D, None if self.norm is None else self.norm.weight))

    def _core(self, x, Bm, Cm, dt, z, dt_bias, A_log, D, norm_weight, state=None):
        """From the conv output's x [B,T,Hs,P], B, C [B,T,G,N] and in_proj's dt [B,T,Hs], z [B,T,Di] to
        out_proj's input: dt and A, the SSD scan, the D skip and the gated norm -> ([B,T,Di], final state)."""
        dt, A = self._dt_A_of(dt, dt_bias, A_log)  # [B, T, Hs], [Hs]
        y, h = self.kernels.ssd_scan(x, dt, A, Bm, Cm, chunk=self.cfg.chunk, state=state)  # [B,T,Hs,P], [B,Hs,P,N]
        return self._gated(y, x, z, D, norm_weight), h

    def forward(self, u: torch.Tensor, state: ConvSSMState | None = None, pos0: int = 0) -> torch.Tensor:
        """Without a cache (training) everything between the conv and out_proj is one `recompute` region:
        autograd keeps the conv output and zxbcdt (z and dt), and the backward recomputes the fp32 dt, the
        scan and the gated norm, as state-spaces/mamba's mamba_split_conv1d_scan_combined keeps zxbcdt."""
        cfg = self.cfg
        B, T, _ = u.shape
        G, N = cfg.n_groups, cfg.d_state
        z, xBC, dt = self._split(self.in_proj(u))  # [B,T,Di], [B,T,Di+2GN], [B,T,Hs]
        xBC = conv_with_state(self.kernels, xBC, self.conv1d, state)
        x, Bm, Cm = xBC.split([cfg.d_inner, G * N, G * N], dim=-1)
        x = x.reshape(B, T, cfg.heads, cfg.head_dim)  # [B, T, Hs, P]
        Bm, Cm = Bm.reshape(B, T, G, N), Cm.reshape(B, T, G, N)
        params = (self.dt_bias, self.A_log, self.D, None if self.norm is None else self.norm.weight)
        if state is None:
            y = recompute(lambda *a: self._core(*a)[0], x, Bm, Cm, dt, z, *params)  # [B, T, Di]
        else:
            y, h = self._core(x, Bm, Cm, dt, z, *params, state=state.ssm)
            state.ssm.copy_(h)
        return self.out_proj(y)  # [B, T, d]

    def step(self, u: torch.Tensor, state: ConvSSMState, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing the conv taps and SSM state in place."""
        cfg = self.cfg
        B = u.shape[0]
        G, N = cfg.n_groups, cfg.d_state
        z, xBC, dt = self._split(self.in_proj(u))  # [B, Di], [B, Di+2GN], [B, Hs]
        xBC = conv_step_with_state(self.kernels, xBC, self.conv1d, state)
        x, Bm, Cm = xBC.split([cfg.d_inner, G * N, G * N], dim=-1)
        x = x.reshape(B, cfg.heads, cfg.head_dim)  # [B, Hs, P]
        dt, A = self._dt_A(dt)  # [B, Hs], [Hs]
        y = self.kernels.ssd_step(x, dt, A, Bm.reshape(B, G, N), Cm.reshape(B, G, N), state.ssm)  # [B, Hs, P]
        return self._finish(y, x, z)


def cp_forward(module: Mamba2, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's tokens u [B, T/cp, d]: the causal conv takes the previous rank's last
    K-1 inputs as its halo; the SSD scan runs twice, first from a zero state to get this rank's final state
    and total decay exp(A * sum dt), then from the state the earlier ranks carry into it (`cp.carry`, the
    scan S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t composed over ranks): exact, as one process."""
    cfg = module.cfg
    B, T, _ = u.shape
    G, N = cfg.n_groups, cfg.d_state
    z, xBC, dt = module._split(module.in_proj(u))  # [B,T,Di], [B,T,Di+2GN], [B,T,Hs]
    xBC = cp.causal_conv(module.kernels, xBC, module.conv1d, silu=True)  # [B, T, C]: the previous rank's halo first
    x, Bm, Cm = xBC.split([cfg.d_inner, G * N, G * N], dim=-1)
    x = x.reshape(B, T, cfg.heads, cfg.head_dim)  # [B, T, Hs, P]
    dt, A = module._dt_A(dt)  # [B, T, Hs], [Hs]
    Bm, Cm = Bm.reshape(B, T, G, N), Cm.reshape(B, T, G, N)
    _, h = module.kernels.ssd_scan(x, dt, A, Bm, Cm, chunk=cfg.chunk, state=None)  # h [B, Hs, P, N]
    decay = torch.exp(A * dt.sum(1))[..., None, None]  # [B, Hs, 1, 1]
    start = cp.carry(h, decay)  # [B, Hs, P, N]
    y, _ = module.kernels.ssd_scan(x, dt, A, Bm, Cm, chunk=cfg.chunk, state=start)  # [B, T, Hs, P]
    return module._finish(y, x, z)  # [B, T, d]


KIND = RuntimeKind(
    name="mamba2",
    module=Mamba2,
    build=Mamba2,
    new_cache=new_cache,
    ops={"causal_conv1d": ops_conv.causal_conv1d, "conv_step": ops_conv.conv_step,
         "ssd_scan": ops_ssd.ssd_scan, "ssd_step": ops_ssd.ssd_step},
    oracles={"causal_conv1d": ops_conv.causal_conv1d_reference, "ssd_scan": _ssd_scan_oracle},
    state_names=state_names,
    cp_forward=cp_forward,
)
