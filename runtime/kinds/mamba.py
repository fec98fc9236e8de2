"""Mamba-1 selective SSM sub-layer (Gu & Dao 2023), optionally with Jamba's inner RMSNorms on dt, B, C.

    x, z = in_proj(u).chunk(2)                 [B,T,Di] each
    x = silu(causal_conv1d(x))                 depthwise, K = d_conv taps
    dt, Bm, Cm = x_proj(x).split([R, N, N])    (Jamba: dt, Bm, Cm each RMSNorm'ed)
    delta = softplus(dt_proj(dt))              [B,T,Di]    A = -exp(A_log) [Di,N]
    y = selective_scan(x, delta, A, Bm, Cm) + D * x;  y = y * silu(z);  out_proj(y) -> [B,T,d]

Mirrors transformers' MambaMixer and JambaMambaMixer (the slow torch path) term by term. With a cache
the conv taps and the SSM state carry over between calls; `step` is the one-token recurrence.

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, its `ConvSSMState` allocation (conv taps
[B, Di, K or K-1] as state-spaces/mamba or vLLM keep them, SSM state [B, Di, N]), the kernel ops it calls
(causal_conv1d, conv_step, selective_scan, selective_step) and its parameter names. `ConvSSMState` and the
conv helpers are shared with Mamba-2 (runtime/kinds/mamba2.py), which keeps the same two tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.mamba import MambaConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_conv, ops_scan
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.chunk_recompute import recompute
from ltmdsl.runtime.tensor_parallel import copy_to_tp, local, segmented, shard_parameters, sum_over_tp, tp_local
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, cp_passed
from ltmdsl.runtime.norm import RMSNorm

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


@dataclass
class ConvSSMState(LayerCache):
    """Conv taps conv [B, C, K or K-1] and the SSM state ssm [B, Di, N] (Mamba-1) or [B, Hs, P, N] (Mamba-2)."""

    component: ClassVar[str] = "recurrent_state"
    conv: torch.Tensor
    ssm: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.conv, self.ssm)


def conv_taps(d_conv: int, req: CacheRequest) -> int:
    """Cached conv inputs: K ("full", state-spaces/mamba) or K-1 ("minus_one", vLLM)."""
    return d_conv if req.conv_taps == "full" else d_conv - 1


def new_cache(cfg: MambaConfig, req: CacheRequest) -> ConvSSMState:
    """Zeroed conv taps [B, Di, taps] and SSM state [B, Di, N] in the state dtype (Di / t inner channels on a
    tensor-parallel rank)."""
    B, dt, dev = req.batch_size, req.state_dtype, req.device
    Di = req.per_rank(cfg.d_inner, "inner channels")
    conv = torch.zeros(B, Di, conv_taps(cfg.d_conv, req), dtype=dt, device=dev)  # [B, Di, taps]
    ssm = torch.zeros(B, Di, cfg.d_state, dtype=dt, device=dev)  # [B, Di, N]
    return ConvSSMState(conv, ssm)


def outputs(cfg: MambaConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): out_proj reads y * silu(z), no norm (Mamba-1)."""
    return {"out_proj.weight": False}


def state_names(cfg: MambaConfig) -> tuple[str, ...]:
    """The parameters a `Mamba` owns (transformers' MambaMixer / JambaMambaMixer names)."""
    names = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
             "out_proj.weight"]
    if cfg.proj_bias:
        names += ["in_proj.bias", "out_proj.bias"]
    if cfg.conv_bias:
        names.append("conv1d.bias")
    if cfg.inner_norms:
        names += ["dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight"]
    return tuple(names)


def conv_with_state(
    kernels: "Kernels", x: torch.Tensor, conv: nn.Conv1d, state: ConvSSMState | None
) -> torch.Tensor:
    """silu(causal conv) of x [B,T,C], continuing from the cached taps and leaving the newest taps there."""
    K = conv.weight.shape[-1]
    prev = None
    if state is not None and K > 1:
        prev = state.conv[:, :, -(K - 1) :]  # [B, C, K-1]: the K-1 inputs before x
    weight, bias = tp_local(conv, "weight")[:, 0], tp_local(conv, "bias")  # [C, K], [C] (tp: this rank's)
    y = kernels.causal_conv1d(x, weight, bias, prev=prev, silu=True)  # [B, T, C]
    if state is not None and state.conv.shape[-1]:
        taps = state.conv.shape[-1]
        state.conv.copy_(torch.cat([state.conv, x.transpose(1, 2).to(state.conv.dtype)], dim=-1)[..., -taps:])
    return y


def conv_step_with_state(
    kernels: "Kernels", x: torch.Tensor, conv: nn.Conv1d, state: ConvSSMState
) -> torch.Tensor:
    """One token x [B,C] -> silu(conv) [B,C]; K cached taps use the in-place `conv_step` kernel, K-1 taps
    (vLLM's layout) convolve [taps ; x] and shift."""
    K = conv.weight.shape[-1]
    if state.conv.shape[-1] == K:
        return kernels.conv_step(x, state.conv, local(conv.weight)[:, 0], local(conv.bias), silu=True)
    y = conv_with_state(kernels, x[:, None], conv, state)  # [B, 1, C]
    return y[:, 0]


class Mamba(nn.Module):
    """forward(x [B,T,d], state: ConvSSMState | None, pos0) -> [B,T,d]; step(x [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: MambaConfig, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        Di, N, R, K = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.in_proj = nn.Linear(d, 2 * Di, bias=cfg.proj_bias)
        self.conv1d = nn.Conv1d(Di, Di, K, groups=Di, padding=K - 1, bias=cfg.conv_bias)  # weight [Di, 1, K]
        self.x_proj = nn.Linear(Di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, Di, bias=True)
        self.A_log = nn.Parameter(torch.empty(Di, N))
        self.D = nn.Parameter(torch.empty(Di))
        self.out_proj = nn.Linear(Di, d, bias=cfg.proj_bias)
        if cfg.inner_norms:
            self.dt_layernorm = RMSNorm(R, eps)
            self.b_layernorm = RMSNorm(N, eps)
            self.c_layernorm = RMSNorm(N, eps)
        else:
            self.dt_layernorm = self.b_layernorm = self.c_layernorm = None

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Like state-spaces/mamba: S4D-real A = -(1..N), D = 1, dt log-uniform in [1e-3, 0.1]."""
        cfg = self.cfg
        init.linear_(self.in_proj, gen)
        init.uniform_(self.conv1d.weight, gen, 1.0 / math.sqrt(cfg.d_conv))
        init.zeros_(self.conv1d.bias)
        init.linear_(self.x_proj, gen)
        init.uniform_(self.dt_proj.weight, gen, cfg.dt_rank**-0.5)
        init.dt_bias_(self.dt_proj.bias, gen)
        init.assign_(self.A_log, torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(cfg.d_inner, -1))
        init.ones_(self.D)
        init.linear_(self.out_proj, gen)
        for n in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
            if n is not None:
                n.init_weights(gen)

    def _xdbl(self, x: torch.Tensor):
        """x [..., Di] (after conv) -> dt [..., R], Bm, Cm [..., N]: x_proj's output (Jamba: each RMSNorm'ed).

        On a tp rank (tp_plan) x holds Di/t channels: x_proj's product is this rank's part of the sum over
        channels, summed over the ranks; dt, B and C are then whole on every rank, and since each rank's
        channels use them, their gradients are summed back (after the inner norms, whose weights then get
        the whole gradient on every rank)."""
        cfg = self.cfg
        mesh = getattr(self.x_proj, "tp_mesh", None)
        proj = F.linear(x, local(self.x_proj.weight))  # [..., R + 2N] (a partial sum on a tp rank)
        if mesh is not None:
            proj = sum_over_tp(proj, mesh)
        dt, Bm, Cm = proj.split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        if self.dt_layernorm is not None:
            dt, Bm, Cm = self.dt_layernorm(dt), self.b_layernorm(Bm), self.c_layernorm(Cm)
        if mesh is not None:
            dt, Bm, Cm = (copy_to_tp(v, mesh.get_group()) for v in (dt, Bm, Cm))
        return dt, Bm, Cm

    @staticmethod
    def _delta(dt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """dt [..., R] -> softplus(dt_proj(dt)) [..., Di] in fp32 (fp64 for fp64 inputs), the bias added in fp32."""
        work = torch.float64 if dt.dtype == torch.float64 else torch.float32
        return F.softplus(F.linear(dt, weight).to(work) + bias.to(work))

    @staticmethod
    def _A_of(A_log: torch.Tensor) -> torch.Tensor:
        work = torch.float64 if A_log.dtype == torch.float64 else torch.float32
        return -torch.exp(A_log.to(work))  # [Di, N]

    @staticmethod
    def _gate(y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """(y + D x) * silu(z) [..., Di], the skip and gate in fp32 like HF, cast back to x's dtype."""
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ((y.to(work) + x.to(work) * D.to(work)) * F.silu(z.to(work))).to(x.dtype)

    def _params(self) -> tuple:
        """(dt_proj weight, dt_proj bias, A_log, D): this rank's channels under tp (`local`)."""
        return local(self.dt_proj.weight), local(self.dt_proj.bias), local(self.A_log), local(self.D)

    def _ssm_inputs(self, x: torch.Tensor):
        """x [..., Di] (after conv) -> delta [..., Di] (fp32, softplus'ed), Bm [..., N], Cm [..., N]."""
        dt, Bm, Cm = self._xdbl(x)
        weight, bias, _, _ = self._params()
        return self._delta(dt, weight, bias), Bm, Cm

    def _A(self, like: torch.Tensor) -> torch.Tensor:
        return self._A_of(local(self.A_log))  # [Di, N] (Di/t on a tp rank)

    def _gate_out(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y [..., Di] -> out_proj((y + D x) * silu(z)) [..., d]."""
        return self.out_proj(self._gate(y, x, z, local(self.D)))

    def _core(self, x, dt, Bm, Cm, z, dt_weight, dt_bias, A_log, D, state=None):
        """From the conv output and x_proj's dt, B, C to out_proj's input: delta, the scan, the D skip and the
        z gate -> ((y + D x) * silu(z) [B,T,Di], final state [B,Di,N])."""
        y, h = self.kernels.selective_scan(x, self._delta(dt, dt_weight, dt_bias), self._A_of(A_log), Bm, Cm,
                                           state=state)  # [B, T, Di], [B, Di, N]
        return self._gate(y, x, z, D), h

    def forward(self, u: torch.Tensor, state: ConvSSMState | None = None, pos0: int = 0) -> torch.Tensor:
        """Without a cache (training) the scan and everything between x_proj and out_proj is one `recompute`
        region: autograd keeps x, dt/B/C and z (in xz), and the backward recomputes the fp32 delta, the scan
        and the gate, as state-spaces/mamba's mamba_inner_fn keeps xz, x_dbl and the conv output."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # [B, T, Di] each
        # [B, T, Di] in token-major memory: x_proj's input and the scan's are then one kept tensor at any batch
        x = conv_with_state(self.kernels, x, self.conv1d, state).contiguous()
        dt, Bm, Cm = self._xdbl(x)  # [B,T,R], [B,T,N], [B,T,N]
        params = self._params()
        if state is None:
            y = recompute(lambda *a: self._core(*a)[0], x, dt, Bm, Cm, z, *params)  # [B, T, Di]
        else:
            y, h = self._core(x, dt, Bm, Cm, z, *params, state=state.ssm)
            state.ssm.copy_(h)
        return self.out_proj(y)  # [B, T, d]

    def step(self, u: torch.Tensor, state: ConvSSMState, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing the conv taps and SSM state in place."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # [B, Di] each
        x = conv_step_with_state(self.kernels, x, self.conv1d, state)  # [B, Di]
        delta, Bm, Cm = self._ssm_inputs(x)  # [B, Di], [B, N], [B, N]
        y = self.kernels.selective_step(x, delta, self._A(x), Bm, Cm, state.ssm)  # [B, Di]
        return self._gate_out(y, x, z)


def cp_forward(module: Mamba, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's tokens u [B, T/cp, d]: the conv's K-1 halo from the previous rank, then
    the selective scan from a zero state (this rank's final state and total decay exp(A * sum delta)), and
    again from the state the earlier ranks carry in (`cp.carry`): exact, as one process.

    As in `forward`, autograd keeps x, dt/B/C and z and nothing of the fp32 work between x_proj and out_proj:
    the zero-start scan (its final state), the total decay and the scan from the carried state with the D
    skip and the z gate are three `recompute` regions; only the ranks' exchange of states (`cp.carry`, a few
    [B, Di, N] states and no token-length tensor) runs outside them, so no collective runs in the backward's
    recomputation. (Until then this form kept the fp32 delta, the scans' chunk states and the skip and gate's
    fp32 work: +85% over a Mamba-1 rank's activations at cp = 2.)"""
    x, z = module.in_proj(u).chunk(2, dim=-1)  # [B, T, Di] each
    # [B, T, Di] token-major, the previous rank's halo first: x_proj's input and the scans' are one kept tensor
    x = cp.causal_conv(module.kernels, x, module.conv1d, silu=True).contiguous()
    dt, Bm, Cm = module._xdbl(x)  # [B,T,R], [B,T,N], [B,T,N]
    params = module._params()  # dt_proj weight, dt_proj bias, A_log, D
    dt_weight, dt_bias, A_log, _ = params

    def final_state(x, dt, Bm, Cm, dt_weight, dt_bias, A_log):  # the zero-start scan's final state [B, Di, N]
        delta = module._delta(dt, dt_weight, dt_bias)  # [B, T, Di] fp32
        return module.kernels.selective_scan(x, delta, module._A_of(A_log), Bm, Cm, state=None)[1]

    def decay_of(dt, dt_weight, dt_bias, A_log):  # exp(A * sum delta) [B, Di, N]
        delta = module._delta(dt, dt_weight, dt_bias)  # [B, T, Di] fp32
        return torch.exp(delta.sum(1)[..., None] * module._A_of(A_log))

    h = recompute(final_state, x, dt, Bm, Cm, dt_weight, dt_bias, A_log)  # [B, Di, N]
    decay = recompute(decay_of, dt, dt_weight, dt_bias, A_log)  # [B, Di, N]
    start = cp.carry(h, decay.to(h.dtype))  # [B, Di, N]
    y = recompute(lambda *a: module._core(*a[:-1], state=a[-1])[0], x, dt, Bm, Cm, z, *params, start)  # [B, T, Di]
    return module.out_proj(y)  # [B, T, d]


def tp_plan(cfg: MambaConfig, tp: int) -> dict:
    """Inner channels split over tp: in_proj column-wise by segments (x and z each by channels:
    `segmented`), the conv's channels, x_proj by its input channels (its dt, B and C summed over the ranks,
    then replicated with the inner norms), dt_proj's output channels, A_log and D with them, out_proj
    row-wise (one all-reduce; its bias replicated). Every channel's scan is its own."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    Di = cfg.d_inner
    if Di % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the mamba's {Di} inner channels")
    return {"": shard_parameters({"A_log": 0, "D": 0}),
            "in_proj": segmented(ColwiseParallel(), {"weight": (Di, Di), "bias": (Di, Di)}),
            "conv1d": shard_parameters(0), "x_proj": shard_parameters({"weight": 1}),
            "dt_proj": shard_parameters(0), "out_proj": RowwiseParallel()}


def trace_loops(c, tokens: int, keys: int) -> int:
    """Chunks of `ops_scan.SCAN_CHUNK` tokens the selective scan runs one at a time (ltmdsl.measure.cost)."""
    return math.ceil(tokens / ops_scan.SCAN_CHUNK)


KIND = RuntimeKind(
    name="mamba",
    module=Mamba,
    build=Mamba,
    new_cache=new_cache,
    ops={"causal_conv1d": ops_conv.causal_conv1d, "conv_step": ops_conv.conv_step,
         "selective_scan": ops_scan.selective_scan, "selective_step": ops_scan.selective_step},
    oracles={"causal_conv1d": ops_conv.causal_conv1d_reference, "selective_scan": ops_scan.selective_scan_reference},
    state_names=state_names,
    outputs=outputs,
    trace_loops=trace_loops,
    cp_inference=cp_passed,
    cp_forward=cp_forward,
    tp_plan=tp_plan,
)
