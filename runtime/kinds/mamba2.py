"""Mamba-2 SSD sub-layer (Dao & Gu 2024), as transformers' Mamba2Mixer computes it.

    z, xBC, dt = in_proj(u).split([Di, Di + 2GN, Hs])
    xBC = silu(causal_conv1d(xBC));  x, Bm, Cm = xBC.split([Di, GN, GN])
    dt = softplus(dt + dt_bias) [B,T,Hs];  A = -exp(A_log) [Hs]
    (`dt_min` > 0: the parallel form clamps dt below, as mamba_ssm's chunked scan applies its dt_limit and its
    one-token step does not; transformers' Zamba2 clamps at time_step_min the same way)
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
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, chunk_loops, cp_passed
from ltmdsl.runtime.kinds.mamba import ConvSSMState, conv_step_with_state, conv_taps, conv_with_state
from ltmdsl.runtime.ops_norm import gated_rmsnorm
from ltmdsl.runtime.tensor_parallel import (GroupSumOnce, grouped_segments, local, segmented, shard_parameters,
                                            sum_over_group, tp_size)

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


def new_cache(cfg: Mamba2Config, req: CacheRequest) -> ConvSSMState:
    """Zeroed conv taps [B, Di + 2GN, taps] and SSM state [B, Hs, P, N] in the state dtype (a tensor-parallel
    rank's Di/t + 2(G/t)N conv channels, one group's 2N at t > G, and Hs/t heads)."""
    B, dt, dev = req.batch_size, req.state_dtype, req.device
    C = req.per_rank(cfg.d_inner, "channels") + 2 * req.kv_per_rank(cfg.n_groups) * cfg.d_state  # x; B and C
    Hs = req.per_rank(cfg.heads, "heads")
    conv = torch.zeros(B, C, conv_taps(cfg.d_conv, req), dtype=dt, device=dev)  # [B, C, taps]
    ssm = torch.zeros(B, Hs, cfg.head_dim, cfg.d_state, dtype=dt, device=dev)  # [B, Hs, P, N]
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


def outputs(cfg: Mamba2Config) -> dict[str, bool]:
    """out_proj reads the gated RMSNorm's unit-RMS output (the gate alone without the norm)."""
    return {"out_proj.weight": cfg.gated_norm}


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
        init.uniform_(self.conv1d.weight, gen, 1.0 / math.sqrt(cfg.d_conv), init.layout_of(self.conv1d, "weight"))
        init.zeros_(self.conv1d.bias)
        init.dt_bias_(self.dt_bias, gen)
        init.assign_(self.A_log, torch.log(1 + 15 * torch.rand(cfg.heads, generator=gen)))
        init.ones_(self.D)
        if self.norm is not None:
            init.ones_(self.norm.weight)
        init.linear_(self.out_proj, gen)

    def sizes(self) -> tuple[int, int, int]:
        """(Di, G, Hs) this module holds: the config's, or its 1/t on a tensor-parallel rank (tp_plan; one
        group, its heads', when t exceeds the groups)."""
        cfg, t = self.cfg, tp_size(self)
        return cfg.d_inner // t, max(1, cfg.n_groups // t), cfg.heads // t

    def _split(self, zxbcdt: torch.Tensor):
        """in_proj's output [..., 2Di + 2GN + Hs] -> z [..., Di], xBC [..., Di + 2GN], dt [..., Hs]."""
        Di, G, Hs = self.sizes()
        GN = G * self.cfg.d_state
        return zxbcdt.split([Di, Di + 2 * GN, Hs], dim=-1)

    @staticmethod
    def _dt_A_of(dt: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor):
        """dt [..., Hs] -> softplus(dt + dt_bias) and A = -exp(A_log), in fp32 (fp64 for fp64 inputs)."""
        work = torch.float64 if dt.dtype == torch.float64 else torch.float32
        return F.softplus(dt.to(work) + dt_bias.to(work)), -torch.exp(A_log.to(work))

    def _dt_A(self, dt: torch.Tensor):
        return self._dt_A_of(dt, local(self.dt_bias), local(self.A_log))

    def _gated(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor,
               norm_weight: torch.Tensor | None, sums=sum_over_group) -> torch.Tensor:
        """y, x [..., Hs, P], z [..., Di] -> gated_norm(y + D x, z) [..., Di] in x's dtype (without the norm:
        (y + D x) * silu(z)). `sums`: how a norm group split over ranks sums its squares
        (`_gated_norm_over_ranks`)."""
        cfg = self.cfg
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = y.to(work) + x.to(work) * D.to(work)[:, None]  # [..., Hs, P]
        y = y.flatten(-2)  # [..., Di] (Di/t on a tp rank: whole norm groups)
        if norm_weight is None:  # gated_norm = false (Falcon-H1's mamba_rms_norm false): the gate alone
            y = y * F.silu(z.to(work))  # [..., Di]
        elif getattr(self.in_proj, "tp_copies", None) is not None:  # a norm group split over the ranks sharing it
            y = self._gated_norm_over_ranks(y, z.to(work), norm_weight.to(work), sums)
        else:
            y = gated_rmsnorm(y, z, norm_weight.to(work), group_size=cfg.d_inner // cfg.n_groups, eps=self.eps)
        return y.to(x.dtype)

    def _gated_norm_over_ranks(self, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                               sums=sum_over_group) -> torch.Tensor:
        """gated_rmsnorm of y, z [..., Di/t] when this rank's channels are part of one norm group of Di/G
        channels split over the t/G ranks sharing the group (n_groups < t): the sum of squares summed over
        them (`sum_over_group`), divided by the group's size. Inside the training forms' `recompute` regions
        `sums` is a `GroupSumOnce`: the backward's recomputation reuses the forward's sums rather than repeating
        their all-reduce, so the backward's one collective is the gradient's."""
        copies = self.in_proj.tp_copies
        h = y * F.silu(z)  # [..., Di/t]
        squares = sums(h.pow(2).sum(-1, keepdim=True), copies.slot, copies.slots, copies.group)  # [..., 1]
        return weight * (h * torch.rsqrt(squares / (self.cfg.d_inner // self.cfg.n_groups) + self.eps))

    def _params(self) -> tuple:
        """(dt_bias, A_log, D, norm weight or None): this rank's heads and channels under tp (`local`)."""
        return (local(self.dt_bias), local(self.A_log), local(self.D),
                None if self.norm is None else local(self.norm.weight))

    def _finish(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, x [..., Hs, P], z [..., Di] -> out_proj(gated_norm(y + D x, z)) [..., d]."""
        _, _, D, norm_weight = self._params()
        return self.out_proj(self._gated(y, x, z, D, norm_weight))

    def _core(self, x, Bm, Cm, dt, z, dt_bias, A_log, D, norm_weight, state=None, sums=sum_over_group):
        """From the conv output's x [B,T,Hs,P], B, C [B,T,G,N] and in_proj's dt [B,T,Hs], z [B,T,Di] to
        out_proj's input: dt and A, the SSD scan, the D skip and the gated norm -> ([B,T,Di], final state).
        The parallel (prefill) form: dt clamped at dt_min (mamba_ssm's dt_limit, Zamba2's time_step_min)."""
        dt, A = self._dt_A_of(dt, dt_bias, A_log)  # [B, T, Hs], [Hs]
        if self.cfg.dt_min > 0:
            dt = dt.clamp(min=self.cfg.dt_min)
        y, h = self.kernels.ssd_scan(x, dt, A, Bm, Cm, chunk=self.cfg.chunk, state=state)  # [B,T,Hs,P], [B,Hs,P,N]
        return self._gated(y, x, z, D, norm_weight, sums), h

    def forward(self, u: torch.Tensor, state: ConvSSMState | None = None, pos0: int = 0) -> torch.Tensor:
        """Without a cache (training) everything between the conv and out_proj is one `recompute` region:
        autograd keeps the conv output and zxbcdt (z and dt), and the backward recomputes the fp32 dt, the
        scan and the gated norm, as state-spaces/mamba's mamba_split_conv1d_scan_combined keeps zxbcdt."""
        cfg = self.cfg
        B, T, _ = u.shape
        (Di, G, Hs), N = self.sizes(), cfg.d_state
        z, xBC, dt = self._split(self.in_proj(u))  # [B,T,Di], [B,T,Di+2GN], [B,T,Hs]
        xBC = conv_with_state(self.kernels, xBC, self.conv1d, state)
        x, Bm, Cm = xBC.split([Di, G * N, G * N], dim=-1)
        x = x.reshape(B, T, Hs, cfg.head_dim)  # [B, T, Hs, P]
        Bm, Cm = Bm.reshape(B, T, G, N), Cm.reshape(B, T, G, N)
        params = self._params()
        if state is None:
            sums = GroupSumOnce()  # the region's rerun in backward reuses the forward's all-reduced norm sums
            y = recompute(lambda *a: self._core(*a, sums=sums)[0], x, Bm, Cm, dt, z, *params)  # [B, T, Di]
        else:
            y, h = self._core(x, Bm, Cm, dt, z, *params, state=state.ssm)
            state.ssm.copy_(h)
        return self.out_proj(y)  # [B, T, d]

    def step(self, u: torch.Tensor, state: ConvSSMState, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing the conv taps and SSM state in place."""
        cfg = self.cfg
        B = u.shape[0]
        (Di, G, Hs), N = self.sizes(), cfg.d_state
        z, xBC, dt = self._split(self.in_proj(u))  # [B, Di], [B, Di+2GN], [B, Hs]
        xBC = conv_step_with_state(self.kernels, xBC, self.conv1d, state)
        x, Bm, Cm = xBC.split([Di, G * N, G * N], dim=-1)
        x = x.reshape(B, Hs, cfg.head_dim)  # [B, Hs, P]
        dt, A = self._dt_A(dt)  # [B, Hs], [Hs]
        y = self.kernels.ssd_step(x, dt, A, Bm.reshape(B, G, N), Cm.reshape(B, G, N), state.ssm)  # [B, Hs, P]
        return self._finish(y, x, z)


def cp_forward(module: Mamba2, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's tokens u [B, T/cp, d]: the causal conv takes the previous rank's last
    K-1 inputs as its halo; the SSD scan runs twice, first from a zero state to get this rank's final state
    and total decay exp(A * sum dt), then from the state the earlier ranks carry into it (`cp.carry`, the
    scan S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t composed over ranks): exact, as one process.

    As in `forward`, autograd keeps the conv output and in_proj's output and nothing of the fp32 work between
    them and out_proj: the zero-start scan (its final state) and the scan from the carried state with the D
    skip and the gated norm are two `recompute` regions; only the ranks' exchange of states (`cp.carry`, a few
    [B, Hs, P, N] states and no token-length tensor) runs outside them, so no collective runs in the backward's
    recomputation. (Until then this form kept the scans' fp32 dt and y, the skip and the gate: +64% over a
    Mamba-2 rank's activations at cp = 2.)"""
    cfg = module.cfg
    B, T, _ = u.shape
    (Di, G, Hs), N = module.sizes(), cfg.d_state
    z, xBC, dt = module._split(module.in_proj(u))  # [B,T,Di], [B,T,Di+2GN], [B,T,Hs]
    xBC = cp.causal_conv(module.kernels, xBC, module.conv1d, silu=True)  # [B, T, C]: the previous rank's halo first
    x, Bm, Cm = xBC.split([Di, G * N, G * N], dim=-1)
    x = x.reshape(B, T, Hs, cfg.head_dim)  # [B, T, Hs, P]
    Bm, Cm = Bm.reshape(B, T, G, N), Cm.reshape(B, T, G, N)
    dt_bias, A_log, D, norm_weight = module._params()

    def dt_A(dt, dt_bias, A_log):  # the fp32 dt and A, with the parallel form's dt limit, as `forward`
        dt, A = module._dt_A_of(dt, dt_bias, A_log)  # [B, T, Hs], [Hs]
        return (dt.clamp(min=cfg.dt_min) if cfg.dt_min > 0 else dt), A

    def final_state(x, Bm, Cm, dt, dt_bias, A_log):  # the zero-start scan's final state [B, Hs, P, N]
        dt, A = dt_A(dt, dt_bias, A_log)
        return module.kernels.ssd_scan(x, dt, A, Bm, Cm, chunk=cfg.chunk, state=None)[1]

    def decay_of(dt, dt_bias, A_log):  # exp(A * sum dt) [B, Hs, 1, 1]
        dt, A = dt_A(dt, dt_bias, A_log)
        return torch.exp(A * dt.sum(1))[..., None, None]

    def gated(x, Bm, Cm, dt, z, start, dt_bias, A_log, D, norm_weight):  # -> out_proj's input [B, T, Di]
        dt, A = dt_A(dt, dt_bias, A_log)
        y, _ = module.kernels.ssd_scan(x, dt, A, Bm, Cm, chunk=cfg.chunk, state=start)  # [B, T, Hs, P]
        return module._gated(y, x, z, D, norm_weight, sums)

    sums = GroupSumOnce()  # as `forward`: the rerun of `gated` reuses the forward's all-reduced norm sums
    h = recompute(final_state, x, Bm, Cm, dt, dt_bias, A_log)  # [B, Hs, P, N]
    start = cp.carry(h, recompute(decay_of, dt, dt_bias, A_log))  # [B, Hs, P, N]
    y = recompute(gated, x, Bm, Cm, dt, z, start, dt_bias, A_log, D, norm_weight)  # [B, T, Di]
    return module.out_proj(y)  # [B, T, d]


def tp_plan(cfg: Mamba2Config, tp: int) -> dict:
    """Megatron-LM's Mamba mixer split: heads and groups over tp. in_proj column-wise by segments (z and x
    by heads, B and C by groups, dt by heads: `segmented`), the conv's x, B, C channels likewise, dt_bias,
    A_log and D by heads, the gated norm's weight by channels (each rank holds whole groups, so the grouped
    RMSNorm stays local), out_proj row-wise (one all-reduce; its bias replicated). Each head reads only its
    own group's B and C, so nothing else crosses ranks.

    Fewer groups than ranks (Mamba-2-2.7B's n_groups = 1; Megatron-LM and mamba_ssm refuse it): each rank holds
    the B and C rows and conv channels of the one group its heads read, replicated over the t/G ranks sharing
    it (`grouped_segments`: their gradients summed over those ranks), and its Di/t channels are part of that
    group's norm, whose sum of squares is summed over them (`Mamba2._gated_norm_over_ranks`)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    G = cfg.n_groups
    if cfg.heads % tp or (G % tp and tp % G):
        raise TensorParallelUnsupported(f"tp = {tp} must divide the mamba2's {cfg.heads} heads, and divide its "
                                        f"{G} groups (n_groups) or be a multiple of them")
    Di, GN = cfg.d_inner, G * cfg.d_state
    proj, conv = (Di, Di, GN, GN, cfg.heads), (Di, GN, GN)
    if G % tp:  # t a multiple of G: B and C replicated beyond the groups
        plan = {"in_proj": grouped_segments({"weight": proj, "bias": proj}, (None, None, G, G, None), linear=True),
                "conv1d": grouped_segments({"weight": conv, "bias": conv}, (None, G, G), linear=False)}
    else:
        plan = {"in_proj": segmented(ColwiseParallel(), {"weight": proj, "bias": proj}),
                "conv1d": segmented(shard_parameters(0), {"weight": conv, "bias": conv})}
    plan = {"": shard_parameters({"dt_bias": 0, "A_log": 0, "D": 0}), **plan, "out_proj": RowwiseParallel()}
    return plan | ({"norm": shard_parameters(0)} if cfg.gated_norm else {})


KIND = RuntimeKind(
    name="mamba2",
    module=Mamba2,
    build=Mamba2,
    new_cache=new_cache,
    ops={"causal_conv1d": ops_conv.causal_conv1d, "conv_step": ops_conv.conv_step,
         "ssd_scan": ops_ssd.ssd_scan, "ssd_step": ops_ssd.ssd_step},
    oracles={"causal_conv1d": ops_conv.causal_conv1d_reference, "ssd_scan": _ssd_scan_oracle},
    state_names=state_names,
    outputs=outputs,
    trace_loops=chunk_loops,
    cp_inference=cp_passed,
    cp_forward=cp_forward,
    tp_plan=tp_plan,
)
