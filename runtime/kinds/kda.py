"""Kimi Delta Attention sub-layer (Kimi Team, "Kimi Linear", 2025), as transformers' KimiDeltaAttention.

    q, k, v = silu(causal_conv1d([q_proj(u) ; k_proj(u) ; v_proj(u)]))       [B,T,H,Dh] each
    g = -exp(A_log) * softplus(f_b_proj(f_a_proj(u)) + dt_bias)              [B,T,H,Dh]  per-channel log-decay
    beta = sigmoid(b_proj(u)) [B,T,H]
    o = gated delta rule (q, k L2-normalised, scale Dh^-0.5, decay per key channel)   [B,T,H,Dh]
    y = o_norm.weight * rmsnorm(o) * sigmoid(g_b_proj(g_a_proj(u))) per head;  o_proj(y) -> [B,T,d]

Names and shapes are transformers' (the forget gate a `forget_gate` submodule, A_log [1, 1, H, 1] as the
published checkpoints store it), so its weights load by name. With a cache the conv taps and the delta state
[B, H, Dh, Dh] carry over; `step` is the one-token recurrence. The runtime entry `KIND`: the module, its
`ConvDeltaState` (shared with Gated DeltaNet, runtime/kinds/gated_deltanet.py), the same kernel ops and its
parameter names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.kda import KDAConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.cache import CacheRequest
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, chunk_loops, cp_passed
from ltmdsl.runtime.kinds.gated_deltanet import (
    DELTA_OPS, DELTA_ORACLES, ConvDeltaState, GatedNormWeight, carried_delta_state, new_delta_state,
    work_dtype,
)
from ltmdsl.runtime.kinds.mamba import conv_step_with_state, conv_with_state
from ltmdsl.runtime.ops_norm_gate import norm_then_gate
from ltmdsl.runtime.tensor_parallel import local, mark_tp, segmented, shard_parameters, shared_weight

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


def new_cache(cfg: KDAConfig, req: CacheRequest) -> ConvDeltaState:
    """Zeroed conv taps [B, 3*H*Dh, taps] and delta state [B, H, Dh, Dh] in the state dtype."""
    return new_delta_state(req, cfg.conv_dim, cfg.d_conv, cfg.heads, cfg.head_dim, cfg.head_dim)


def outputs(cfg: KDAConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): o_proj reads rmsnorm(o) * sigmoid(gate): normalised."""
    return {"o_proj.weight": True}


def state_names(cfg: KDAConfig) -> tuple[str, ...]:
    """The parameters a `KDA` owns (transformers' KimiDeltaAttention names)."""
    names = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "conv1d.weight", "forget_gate.f_a_proj.weight",
             "forget_gate.f_b_proj.weight", "forget_gate.dt_bias", "forget_gate.A_log", "b_proj.weight",
             "g_a_proj.weight", "g_b_proj.weight", "o_norm.weight", "o_proj.weight"]
    if cfg.conv_bias:
        names.append("conv1d.bias")
    return tuple(names)


class ForgetGate(nn.Module):
    """The per-channel log-decay g = -exp(A_log) * softplus(f_b_proj(f_a_proj(u)) + dt_bias).

    u [..., d] -> g [..., H, Dh] in fp32 (fp64 for fp64 inputs); f_a_proj has rank Dh, as in transformers.
    """

    def __init__(self, cfg: KDAConfig, d: int):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.f_a_proj = nn.Linear(d, cfg.head_dim, bias=False)
        self.f_b_proj = nn.Linear(cfg.head_dim, cfg.inner, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(cfg.inner))
        self.A_log = nn.Parameter(torch.empty(1, 1, cfg.heads, 1))  # [1, 1, H, 1] as the checkpoints store it

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        work = work_dtype(u)
        x = self.f_b_proj(self.f_a_proj(u)).to(work) + local(self.dt_bias).to(work)  # [..., H*Dh] (H/t on a tp rank)
        x = x.unflatten(-1, (-1, self.head_dim))  # [..., H, Dh]
        return -torch.exp(local(self.A_log).to(work).view(-1, 1)) * F.softplus(x)


class KDA(nn.Module):
    """forward(x [B,T,d], state: ConvDeltaState | None, pos0) -> [B,T,d]; step(x [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: KDAConfig, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg, self.kernels, self.eps = cfg, kernels, eps
        HD, K = cfg.inner, cfg.d_conv
        self.q_proj = nn.Linear(d, HD, bias=False)
        self.k_proj = nn.Linear(d, HD, bias=False)
        self.v_proj = nn.Linear(d, HD, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, K, groups=cfg.conv_dim, padding=K - 1,
                                bias=cfg.conv_bias)  # weight [3*H*Dh, 1, K]
        self.forget_gate = ForgetGate(cfg, d)
        self.b_proj = nn.Linear(d, cfg.heads, bias=False)
        self.g_a_proj = nn.Linear(d, cfg.head_dim, bias=False)
        self.g_b_proj = nn.Linear(cfg.head_dim, HD, bias=False)
        self.o_norm = GatedNormWeight(cfg.head_dim)
        self.o_proj = nn.Linear(HD, d, bias=False)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """As transformers' KimiLinearPreTrainedModel (following flash-linear-attention): linear and conv weights
        normal(0, 0.02), A_log = log(A) with A uniform in [1, 16], dt log-uniform in [1e-3, 0.1] stored as
        softplus^-1(dt) in dt_bias, o_norm weight 1."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.forget_gate.f_a_proj, self.forget_gate.f_b_proj,
                    self.b_proj, self.g_a_proj, self.g_b_proj, self.o_proj):
            init.linear_(lin, gen)
        init.normal_(self.conv1d.weight, gen, layout=init.layout_of(self.conv1d, "weight"))
        init.zeros_(self.conv1d.bias)
        init.assign_(self.forget_gate.A_log, torch.log(1 + 15 * torch.rand(self.forget_gate.A_log.shape, generator=gen)))
        init.dt_bias_(self.forget_gate.dt_bias, gen)
        init.ones_(self.o_norm.weight)

    def _qkv(self, u: torch.Tensor) -> torch.Tensor:
        """u [..., d] -> [q ; k ; v] [..., 3*H*Dh], the conv's input."""
        return torch.cat([self.q_proj(u), self.k_proj(u), self.v_proj(u)], dim=-1)

    def _rule_inputs(self, qkv: torch.Tensor, u: torch.Tensor):
        """qkv [..., 3*H*Dh] (after the conv), u [..., d] -> q, k, v [..., H, Dh], g [..., H, Dh], beta [..., H]."""
        cfg = self.cfg
        q, k, v = (t.unflatten(-1, (-1, cfg.head_dim)) for t in qkv.chunk(3, dim=-1))  # H/t heads on a tp rank
        beta = torch.sigmoid(self.b_proj(u).to(work_dtype(u)))  # [..., H]
        return q, k, v, self.forget_gate(u), beta

    def _finish(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """o [..., H, Dh] -> o_proj(o_norm.weight * rmsnorm(o) * sigmoid(output gate)) [..., d]."""
        cfg = self.cfg
        gate = self.g_b_proj(self.g_a_proj(u)).unflatten(-1, (-1, cfg.head_dim))  # [..., H, Dh]
        y = norm_then_gate(o, gate, shared_weight(self.o_norm), self.eps, torch.sigmoid, block=cfg.chunk)  # [..., H, Dh]
        return self.o_proj(y.flatten(-2).to(u.dtype))

    def forward(self, u: torch.Tensor, state: ConvDeltaState | None = None, pos0: int = 0) -> torch.Tensor:
        qkv = conv_with_state(self.kernels, self._qkv(u), self.conv1d, state)  # [B, T, 3*H*Dh]
        q, k, v, g, beta = self._rule_inputs(qkv, u)
        o, s = self.kernels.gated_delta_chunked(
            q, k, v, g, beta, chunk=self.cfg.chunk, state=None if state is None else state.delta,
            l2norm=True, scale=None,
        )  # [B, T, H, Dh], [B, H, Dh, Dh]
        del qkv, q, k, v, g, beta  # released before the output gate and norm, which read o and u only
        if state is not None:
            state.delta.copy_(s)
        del s
        return self._finish(o, u)  # [B, T, d]

    def step(self, u: torch.Tensor, state: ConvDeltaState, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing the conv taps and the delta state in place."""
        qkv = conv_step_with_state(self.kernels, self._qkv(u), self.conv1d, state)  # [B, 3*H*Dh]
        q, k, v, g, beta = self._rule_inputs(qkv, u)
        o = self.kernels.gated_delta_step(q, k, v, g, beta, state.delta, l2norm=True, scale=None)  # [B, H, Dh]
        return self._finish(o, u)


def cp_forward(module: KDA, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's tokens u [B, T/cp, d]: the conv continues from the previous rank's K-1
    inputs, and the per-channel delta rule from the state the earlier ranks carry in: exact."""
    qkv = cp.causal_conv(module.kernels, module._qkv(u), module.conv1d, silu=True)  # [B, T, 3*H*Dh]
    q, k, v, g, beta = module._rule_inputs(qkv, u)
    start = carried_delta_state(module.kernels, q, k, v, g, beta, module.cfg.chunk, cp)
    o, _ = module.kernels.gated_delta_chunked(q, k, v, g, beta, chunk=module.cfg.chunk, state=start,
                                              l2norm=True, scale=None)  # [B, T, H, Dh]
    return module._finish(o, u)  # [B, T, d]

def tp_plan(cfg: KDAConfig, tp: int) -> dict:
    """Heads over tp: q, k, v, b and the up-projections of the forget and output gates (f_b_proj, g_b_proj)
    column-wise, the conv's q, k, v channels by segments (`segmented`), dt_bias and A_log with their heads;
    the rank-Dh down-projections f_a_proj and g_a_proj replicated (their outputs' gradients summed by the
    column-wise up-projections), the shared o_norm weight replicated with its gradient summed, o_proj
    row-wise (one all-reduce). Every head's delta rule is its own."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if cfg.heads % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the kda's {cfg.heads} heads")
    conv = (cfg.inner,) * 3
    plan = {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj", "b_proj", "g_b_proj",
                                                  "forget_gate.f_b_proj")}
    return plan | {"forget_gate": shard_parameters({"dt_bias": 0, "A_log": 2}),
                   "conv1d": segmented(shard_parameters(0), {"weight": conv, "bias": conv}),
                   "o_norm": mark_tp(), "o_proj": RowwiseParallel()}


KIND = RuntimeKind(
    name="kda",
    module=KDA,
    build=KDA,
    new_cache=new_cache,
    ops=DELTA_OPS,
    oracles=DELTA_ORACLES,
    state_names=state_names,
    outputs=outputs,
    trace_loops=chunk_loops,
    cp_inference=cp_passed,
    cp_forward=cp_forward,
    tp_plan=tp_plan,
)
