"""Gated DeltaNet sub-layer (Yang, Kautz & Hatamizadeh, ICLR 2025), as transformers' Qwen3NextGatedDeltaNet.

    qkvz = in_proj_qkvz(u), grouped by key head: [q Dk | k Dk | v r*Dv | z r*Dv] per key head (r = Hv/Hk)
    ba = in_proj_ba(u), grouped by key head: [b r | a r]
    q, k, v = silu(causal_conv1d([q ; k ; v]))                 q, k [B,T,Hk,Dk], v [B,T,Hv,Dv]
    g = -exp(A_log) * softplus(a + dt_bias) [B,T,Hv];  beta = sigmoid(b) [B,T,Hv]
    o = gated delta rule (q, k L2-normalised, scale Dk^-0.5)    [B,T,Hv,Dv]
    y = norm.weight * rmsnorm(o) * silu(z) per value head;  out_proj(y) -> [B,T,d]

The grouped projection layouts are transformers' (its `fix_query_key_value_ordering`), so its weights load
by name. With a cache the conv taps and the delta state [B, Hv, Dk, Dv] carry over; `step` is the one-token
recurrence. The runtime entry `KIND` (runtime/kinds/__init__.py): the module, its `ConvDeltaState`
allocation (conv taps [B, conv_dim, K or K-1], delta state [B, Hv, Dk, Dv], both in the state dtype), the
kernel ops it calls (causal_conv1d, conv_step, gated_delta_chunked, gated_delta_step) and its parameter
names. KDA (runtime/kinds/kda.py) shares the state class; both gate their output with the norm-then-gate
RMSNorm of runtime/ops_norm_gate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.gated_deltanet import GatedDeltaNetConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_conv, ops_delta
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.chunk_recompute import recompute
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, chunk_loops, cp_passed
from ltmdsl.runtime.kinds.mamba import conv_step_with_state, conv_taps, conv_with_state
from ltmdsl.runtime.ops_norm_gate import norm_then_gate
from ltmdsl.runtime.tensor_parallel import local, mark_tp, segmented, shard_parameters, shared_weight, tp_size

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


@dataclass
class ConvDeltaState(LayerCache):
    """Conv taps conv [B, conv_dim, K or K-1] and the delta-rule state delta [B, Hv, Dk, Dv]."""

    component: ClassVar[str] = "recurrent_state"
    conv: torch.Tensor
    delta: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.conv, self.delta)


def new_delta_state(req: CacheRequest, conv_dim: int, d_conv: int, heads: int, dk: int, dv: int) -> ConvDeltaState:
    """Zeroed conv taps [B, conv_dim, taps] and delta state [B, Hv, Dk, Dv] in the state dtype (conv_dim / t
    channels and Hv / t heads on a tensor-parallel rank)."""
    B, dt, dev = req.batch_size, req.state_dtype, req.device
    conv_dim, heads = req.per_rank(conv_dim, "conv channels"), req.per_rank(heads, "heads")
    conv = torch.zeros(B, conv_dim, conv_taps(d_conv, req), dtype=dt, device=dev)  # [B, conv_dim, taps]
    delta = torch.zeros(B, heads, dk, dv, dtype=dt, device=dev)  # [B, Hv, Dk, Dv]
    return ConvDeltaState(conv, delta)


def new_cache(cfg: GatedDeltaNetConfig, req: CacheRequest) -> ConvDeltaState:
    return new_delta_state(req, cfg.conv_dim, cfg.d_conv, cfg.value_heads, cfg.head_dim, cfg.v_head_dim)


def outputs(cfg: GatedDeltaNetConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): out_proj reads rmsnorm(o) * silu(z): normalised."""
    return {"out_proj.weight": True}


def state_names(cfg: GatedDeltaNetConfig) -> tuple[str, ...]:
    """The parameters a `GatedDeltaNet` owns (transformers' Qwen3NextGatedDeltaNet names)."""
    names = ["in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "dt_bias", "A_log", "norm.weight",
             "out_proj.weight"]
    if cfg.conv_bias:
        names.append("conv1d.bias")
    return tuple(names)


def gated_delta_oracle(q, k, v, g, beta, *, chunk, state, l2norm, scale):
    """The token-loop oracle behind the chunked op's signature (the oracle has no chunk length)."""
    return ops_delta.gated_delta_reference(q, k, v, g, beta, state=state, l2norm=l2norm, scale=scale)


#: The reference ops the delta-rule kinds call, and the oracle of the chunked one.
DELTA_OPS = {"causal_conv1d": ops_conv.causal_conv1d, "conv_step": ops_conv.conv_step,
             "gated_delta_chunked": ops_delta.gated_delta_chunked, "gated_delta_step": ops_delta.gated_delta_step}
DELTA_ORACLES = {"causal_conv1d": ops_conv.causal_conv1d_reference, "gated_delta_chunked": gated_delta_oracle}


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Gates and norms run in fp32, or fp64 for fp64 inputs (the oracle precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class GatedNormWeight(nn.Module):
    """Holds `norm.weight` [Dv] of the gated RMSNorm (the math lives in ops_norm_gate.norm_then_gate)."""

    def __init__(self, dv: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dv))


class GatedDeltaNet(nn.Module):
    """forward(x [B,T,d], state: ConvDeltaState | None, pos0) -> [B,T,d]; step(x [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: GatedDeltaNetConfig, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg, self.kernels, self.eps = cfg, kernels, eps
        K = cfg.d_conv
        self.in_proj_qkvz = nn.Linear(d, 2 * cfg.key_dim + 2 * cfg.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(d, 2 * cfg.value_heads, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, K, groups=cfg.conv_dim, padding=K - 1,
                                bias=cfg.conv_bias)  # weight [conv_dim, 1, K]
        self.dt_bias = nn.Parameter(torch.empty(cfg.value_heads))
        self.A_log = nn.Parameter(torch.empty(cfg.value_heads))
        self.norm = GatedNormWeight(cfg.v_head_dim)
        self.out_proj = nn.Linear(cfg.value_dim, d, bias=False)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """As transformers' Qwen3NextPreTrainedModel: linear and conv weights normal(0, 0.02), dt_bias = 1,
        A_log = log(A) with A uniform in [0.01, 16], norm weight 1."""
        init.linear_(self.in_proj_qkvz, gen)
        init.linear_(self.in_proj_ba, gen)
        init.normal_(self.conv1d.weight, gen, layout=init.layout_of(self.conv1d, "weight"))
        init.zeros_(self.conv1d.bias)
        init.ones_(self.dt_bias)
        init.assign_(self.A_log, torch.log(0.01 + (16 - 0.01) * torch.rand(self.cfg.value_heads, generator=gen)))
        init.ones_(self.norm.weight)
        init.linear_(self.out_proj, gen)

    def _project(self, u: torch.Tensor):
        """u [..., d] -> qkv [..., conv_dim] (q, k, v concatenated for the conv), z [..., Hv, Dv], b, a [..., Hv]
        (a tp rank's Hk/t key heads and their value heads: in_proj_qkvz and in_proj_ba are laid out by key
        head, so those are one block of rows)."""
        cfg = self.cfg
        r = cfg.value_heads // cfg.key_heads  # value heads per key head
        Dk, Dv = cfg.head_dim, cfg.v_head_dim
        qkvz = self.in_proj_qkvz(u).unflatten(-1, (-1, 2 * Dk + 2 * r * Dv))  # [..., Hk, 2Dk + 2rDv]
        q, k, v, z = qkvz.split([Dk, Dk, r * Dv, r * Dv], dim=-1)
        b, a = self.in_proj_ba(u).unflatten(-1, (-1, 2 * r)).split([r, r], dim=-1)  # [..., Hk, r] each
        qkv = torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)  # [..., conv_dim]
        # z [..., Hv, Dv] its own copy: with one key head (a tp rank holding Hk/t = 1) flattening the split is a
        # view, and the norm's saved gate kept in_proj_qkvz's whole output alive (+6% of a tp = 2 rank's
        # activations); otherwise reshape already copies it
        z = z.flatten(-2).unflatten(-1, (-1, Dv)).contiguous()
        return qkv, z, b.flatten(-2), a.flatten(-2)

    def _rule_inputs(self, qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor):
        """qkv [..., conv_dim] (after the conv) -> q, k [..., Hk, Dk], v [..., Hv, Dv], g, beta [..., Hv]."""
        cfg = self.cfg
        t = tp_size(self)
        q, k, v = qkv.split([cfg.key_dim // t, cfg.key_dim // t, cfg.value_dim // t], dim=-1)
        work = work_dtype(qkv)
        g = -torch.exp(local(self.A_log).to(work)) * F.softplus(a.to(work) + local(self.dt_bias).to(work))  # [..., Hv]
        beta = torch.sigmoid(b.to(work))  # [..., Hv]
        return (q.unflatten(-1, (-1, cfg.head_dim)), k.unflatten(-1, (-1, cfg.head_dim)),
                v.unflatten(-1, (-1, cfg.v_head_dim)), g, beta)

    def _finish(self, o: torch.Tensor, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """o, z [..., Hv, Dv] -> out_proj(norm.weight * rmsnorm(o) * silu(z)) [..., d]. The norm's weight is
        shared by every head: on a tp rank, whose heads give only part of its gradient, that is summed."""
        y = norm_then_gate(o, z, shared_weight(self.norm), self.eps, F.silu, block=self.cfg.chunk)  # [..., Hv, Dv]
        return self.out_proj(y.flatten(-2).to(like.dtype))

    def forward(self, u: torch.Tensor, state: ConvDeltaState | None = None, pos0: int = 0) -> torch.Tensor:
        qkv, z, b, a = self._project(u)  # [B,T,conv_dim], [B,T,Hv,Dv], [B,T,Hv] x2
        qkv = conv_with_state(self.kernels, qkv, self.conv1d, state)  # [B, T, conv_dim]
        q, k, v, g, beta = self._rule_inputs(qkv, b, a)
        o, s = self.kernels.gated_delta_chunked(
            q, k, v, g, beta, chunk=self.cfg.chunk, state=None if state is None else state.delta,
            l2norm=True, scale=None,
        )  # [B, T, Hv, Dv], [B, Hv, Dk, Dv]
        del qkv, q, k, v, g, beta, b, a  # released before the output norm, which reads o and z only
        if state is not None:
            state.delta.copy_(s)
        del s
        return self._finish(o, z, u)  # [B, T, d]

    def step(self, u: torch.Tensor, state: ConvDeltaState, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing the conv taps and the delta state in place."""
        qkv, z, b, a = self._project(u)  # [B, conv_dim], [B, Hv, Dv], [B, Hv] x2
        qkv = conv_step_with_state(self.kernels, qkv, self.conv1d, state)  # [B, conv_dim]
        q, k, v, g, beta = self._rule_inputs(qkv, b, a)
        o = self.kernels.gated_delta_step(q, k, v, g, beta, state.delta, l2norm=True, scale=None)  # [B, Hv, Dv]
        return self._finish(o, z, u)


def carried_delta_state(kernels, q, k, v, g, beta, chunk: int, cp) -> torch.Tensor:
    """The delta-rule state entering a context-parallel rank (Gated DeltaNet and KDA).

    The rule is linear in its state: after the decay and the correction, S_t = A_t S_{t-1} + beta_t k_t v_t^T
    with A_t = (I - beta_t k_t k_t^T) diag(exp g_t), so a rank's final state is M S_0 + H with M = A_n ... A_1.
    H is the chunked rule run from zero; M the same rule run on the identity with zero values (its state is
    then M I); `cp.carry_linear` composes them over the earlier ranks -> [B, Hv, Dk, Dv].

    Both runs are `recompute` regions over the rule's own inputs (the storages the rank's last run keeps
    anyway): M's zero values [B, T, Hv, Dk] and identity start are made inside its region, so autograd keeps
    neither (until then the zero values were kept, a*b*s*Hv*Dk a sub-layer, 17% of a Gated DeltaNet rank's
    activations at cp = 2). Only the composition over the ranks runs outside them."""
    def own_state(q, k, v, g, beta):  # the rule from zero -> H [B, Hv, Dk, Dv]
        return kernels.gated_delta_chunked(q, k, v, g, beta, chunk=chunk, state=None, l2norm=True, scale=None)[1]

    def transition(q, k, g, beta):  # the rule on the identity with zero values -> M [B, Hv, Dk, Dk]
        (B, T, Hv), Dk = beta.shape[:3], k.shape[-1]
        eye = torch.eye(Dk, dtype=beta.dtype, device=beta.device).expand(B, Hv, Dk, Dk)  # [B, Hv, Dk, Dk]
        no_values = torch.zeros(B, T, Hv, Dk, dtype=q.dtype, device=q.device)  # [B, T, Hv, Dk]
        return kernels.gated_delta_chunked(q, k, no_values, g, beta, chunk=chunk, state=eye, l2norm=True,
                                           scale=None)[1]

    h = recompute(own_state, q, k, v, g, beta)  # [B, Hv, Dk, Dv]
    m = recompute(transition, q, k, g, beta)  # [B, Hv, Dk, Dk]
    return cp.carry_linear(h, m)  # [B, Hv, Dk, Dv]


def cp_forward(module: GatedDeltaNet, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's tokens u [B, T/cp, d]: the conv continues from the previous rank's K-1
    inputs, and the delta rule from the state the earlier ranks carry in (`carried_delta_state`): exact."""
    qkv, z, b, a = module._project(u)  # [B,T,conv_dim], [B,T,Hv,Dv], [B,T,Hv] x2
    qkv = cp.causal_conv(module.kernels, qkv, module.conv1d, silu=True)  # [B, T, conv_dim]
    q, k, v, g, beta = module._rule_inputs(qkv, b, a)
    start = carried_delta_state(module.kernels, q, k, v, g, beta, module.cfg.chunk, cp)
    o, _ = module.kernels.gated_delta_chunked(q, k, v, g, beta, chunk=module.cfg.chunk, state=start,
                                              l2norm=True, scale=None)  # [B, T, Hv, Dv]
    return module._finish(o, z, u)  # [B, T, d]

def tp_plan(cfg: GatedDeltaNetConfig, tp: int) -> dict:
    """Whole key heads (each with its r value heads) over tp: in_proj_qkvz and in_proj_ba column-wise (laid
    out by key head, so a rank's heads are one block of rows), the conv's q, k, v channels by segments
    (`segmented`), dt_bias and A_log by value heads, the shared output-norm weight replicated (its gradient
    summed), out_proj row-wise (one all-reduce). Every head's delta rule is its own."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if cfg.key_heads % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the gated_deltanet's {cfg.key_heads} key heads")
    conv = (cfg.key_dim, cfg.key_dim, cfg.value_dim)
    return {"": shard_parameters({"dt_bias": 0, "A_log": 0}), "in_proj_qkvz": ColwiseParallel(),
            "in_proj_ba": ColwiseParallel(), "conv1d": segmented(shard_parameters(0), {"weight": conv, "bias": conv}),
            "norm": mark_tp(), "out_proj": RowwiseParallel()}


KIND = RuntimeKind(
    name="gated_deltanet",
    module=GatedDeltaNet,
    build=GatedDeltaNet,
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
