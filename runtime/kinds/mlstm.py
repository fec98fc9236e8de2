"""xLSTM-7B's mLSTM sub-layer, as transformers' xLSTMLayer (weight_mode "single") computes it.

    q, k [B,T,H,Dqk]; v, o [B,T,H,Dv] = q(u), k(u), v(u), ogate_preact(u)
    i, f [B,T,H] = cap(igate_preact(u)), cap(fgate_preact(u))        cap(x) = s tanh(x / s)
    h, state = mlstm_chunked(q, k, v, i, logsigmoid(f))              runtime/ops_mlstm.py, q scaled by Dqk^-1/2
    out_proj(sigmoid(o) * layernorm_per_head(h) * weight (+ bias)) -> [B,T,d]

Gates and the per-head LayerNorm run in fp32 (fp64 for fp64 inputs), as transformers reduces them. With a
cache the stabilised state (C [B,H,Dqk,Dv], n [B,H,Dqk], m [B,H]) carries over; `step` is the one-token
recurrence. The empty state is zeros with m = 0, as transformers and the xLSTM kernels start.

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, its `MlstmCache` allocation (in the state
dtype), the kernel ops it calls (mlstm_chunked, mlstm_step) and its parameter names (transformers').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.mlstm import MlstmConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_mlstm
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.chunk_recompute import recompute
from ltmdsl.runtime.tensor_parallel import local, shard_parameters
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, chunk_loops, cp_passed
from ltmdsl.runtime.ops_mlstm import MlstmState

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


@dataclass
class MlstmCache(LayerCache):
    """The stabilised mLSTM state: C [B,H,Dqk,Dv], n [B,H,Dqk], m [B,H], in the state dtype."""

    component: ClassVar[str] = "recurrent_state"
    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.C, self.n, self.m)

    def state(self) -> MlstmState:
        return MlstmState(self.C, self.n, self.m)


def new_cache(cfg: MlstmConfig, req: CacheRequest) -> MlstmCache:
    """The empty state (zeros, m = 0) in the state dtype (H / t heads on a tensor-parallel rank)."""
    s = ops_mlstm.mlstm_empty_state(req.batch_size, req.per_rank(cfg.heads, "heads"), cfg.dqk, cfg.dv,
                                    dtype=req.state_dtype, device=req.device)
    return MlstmCache(s.C, s.n, s.m)


def outputs(cfg: MlstmConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): out_proj reads sigmoid(o) * the heads' LayerNorm: normalised."""
    return {"out_proj.weight": True}


def state_names(cfg: MlstmConfig) -> tuple[str, ...]:
    """The parameters an `Mlstm` owns (transformers' xLSTMLayer names, weight_mode "single")."""
    names = [f"{p}.weight" for p in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact", "out_proj")]
    names += ["igate_preact.bias", "fgate_preact.bias", "multihead_norm.weight"]
    if cfg.bias:
        names += [f"{p}.bias" for p in ("q", "k", "v", "ogate_preact", "out_proj", "multihead_norm")]
    return tuple(names)


def _mlstm_oracle(q, k, v, i_gate, log_f, *, chunk, state, scale=None, eps=1e-6):
    """The token-loop oracle behind the chunked op's signature (the oracle has no chunk length)."""
    return ops_mlstm.mlstm_reference(q, k, v, i_gate, log_f, state=state, scale=scale, eps=eps)


class MultiHeadNorm(nn.Module):
    """Holds `multihead_norm.weight` [V] (and `.bias`): a LayerNorm over each head's Dv channels."""

    def __init__(self, heads: int, width: int, eps: float, bias: bool):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H, Dv] -> [..., H*Dv]: statistics in fp32 (fp64 stays fp64), cast back, then weight (+bias)."""
        return self.normalise(h, local(self.weight), None if self.bias is None else local(self.bias))

    def normalise(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`forward` with the weight and bias given (V/t of them under tensor parallelism)."""
        dtype = h.dtype
        x = h if dtype == torch.float64 else h.float()
        x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # the biased variance, as LayerNorm
        x = x.to(dtype).flatten(-2) * weight  # [..., V]
        return x if bias is None else x + bias


class Mlstm(nn.Module):
    """forward(u [B,T,d], state: MlstmCache | None, pos0) -> [B,T,d]; step(u [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: MlstmConfig, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        Qk, V, H = cfg.qk_dim, cfg.v_dim, cfg.heads
        self.q = nn.Linear(d, Qk, bias=cfg.bias)
        self.k = nn.Linear(d, Qk, bias=cfg.bias)
        self.v = nn.Linear(d, V, bias=cfg.bias)
        self.ogate_preact = nn.Linear(d, V, bias=cfg.bias)
        self.igate_preact = nn.Linear(d, H, bias=True)
        self.fgate_preact = nn.Linear(d, H, bias=True)
        self.multihead_norm = MultiHeadNorm(H, V, cfg.norm_eps, cfg.bias)
        self.out_proj = nn.Linear(V, d, bias=cfg.bias)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Projections normal(0, 0.02); input-gate bias -10 and forget-gate bias linspace(3, 6) over the
        heads (xLSTM-7B's initialisation: start writing little and forgetting slowly); norm weight 1."""
        for lin in (self.q, self.k, self.v, self.ogate_preact, self.igate_preact, self.fgate_preact, self.out_proj):
            init.linear_(lin, gen)
        init.assign_(self.igate_preact.bias, torch.tensor(-10.0))
        init.assign_(self.fgate_preact.bias, torch.linspace(3.0, 6.0, self.cfg.heads))
        init.ones_(self.multihead_norm.weight)
        init.zeros_(self.multihead_norm.bias)

    def _projections(self, u: torch.Tensor):
        """u [..., d] -> q, k [..., H, Dqk]; v [..., H, Dv]; the gates' pre-activations i, f [..., H] (u's dtype)."""
        cfg = self.cfg
        q, k = self.q(u), self.k(u)  # [..., H*Dqk] (H/t heads under tensor parallelism)
        heads = (*u.shape[:-1], q.shape[-1] // cfg.dqk)
        q, k = q.reshape(*heads, cfg.dqk), k.reshape(*heads, cfg.dqk)
        v = self.v(u).reshape(*heads, cfg.dv)
        return q, k, v, self.igate_preact(u), self.fgate_preact(u)

    def _gates(self, i: torch.Tensor, f: torch.Tensor):
        """Pre-activations [..., H] -> (soft-capped i, log sigmoid of the soft-capped f) in the work dtype."""
        cfg = self.cfg
        work = torch.float64 if i.dtype == torch.float64 else torch.float32
        i, f = i.to(work), f.to(work)
        if cfg.soft_cap is not None:
            i, f = cfg.soft_cap * torch.tanh(i / cfg.soft_cap), cfg.soft_cap * torch.tanh(f / cfg.soft_cap)
        return i, F.logsigmoid(f)

    def _inputs(self, u: torch.Tensor):
        """u [..., d] -> q, k [..., H, Dqk]; v, o [..., H, Dv]; i, log f [..., H] in the work dtype."""
        q, k, v, i, f = self._projections(u)
        return (q, k, v, *self._gates(i, f))

    def _gated_norm(self, h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """h [..., H, Dv], o [..., V] (the output gate's pre-activation) -> sigmoid(o) * norm(h) [..., V]."""
        return torch.sigmoid(o) * self.multihead_norm.normalise(h.to(o.dtype), weight, bias)

    def _finish(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """h [..., H, Dv] -> out_proj(sigmoid(o) * norm(h)) [..., d]."""
        norm = self.multihead_norm
        return self.out_proj(self._gated_norm(h, self.ogate_preact(u), local(norm.weight), local(norm.bias)))

    def _core(self, q, k, v, i, f, o, weight, bias, state=None):
        """From the projections (gates before their cap) to out_proj's input: the gates, the chunked mLSTM,
        the per-head norm and the output gate -> (sigmoid(o) * norm(h) [B,T,V], final MlstmState)."""
        i, log_f = self._gates(i, f)  # [B, T, H]
        h, last = self.kernels.mlstm_chunked(q, k, v, i, log_f, chunk=self.cfg.chunk, state=state, eps=self.cfg.eps)
        return self._gated_norm(h, o, weight, bias), last

    def forward(self, u: torch.Tensor, state: MlstmCache | None = None, pos0: int = 0) -> torch.Tensor:
        """Without a cache (training) everything between the projections and out_proj is one `recompute`
        region: autograd keeps q, k, v, o and the gates' pre-activations, and the backward recomputes the fp32
        gates, the chunked mLSTM and the norm (the xLSTM kernels keep their inputs)."""
        q, k, v, i, f = self._projections(u)  # [B, T, H, D*], [B, T, H]
        o = self.ogate_preact(u)  # [B, T, V]
        norm = self.multihead_norm
        params = (local(norm.weight), None if norm.bias is None else local(norm.bias))
        if state is None:
            y = recompute(lambda *a: self._core(*a)[0], q, k, v, i, f, o, *params)  # [B, T, V]
        else:
            y, last = self._core(q, k, v, i, f, o, *params, state=state.state())
            for dst, src in zip(state.tensors(), last):
                dst.copy_(src)
        return self.out_proj(y)  # [B, T, d]

    def step(self, u: torch.Tensor, state: MlstmCache, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing C, n and m in place."""
        q, k, v, i, log_f = self._inputs(u)  # [B, H, D*], [B, H]
        h = self.kernels.mlstm_step(q, k, v, i, log_f, state.state(), eps=self.cfg.eps)  # [B, H, Dv]
        return self._finish(h, u)


def cp_forward(module: Mlstm, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's pieces u [p*B, c, d] (folded chunks), exact as one process, the stabiliser
    included.

    The true memory exp(m) C (and exp(m) n) is linear: leaving chunk j it is exp(F_j) times the entering
    one plus what chunk j wrote, F_j the sum of its log forget gates. Each chunk first runs from an empty
    memory with m = -inf (so m_t is the running max of what it wrote alone), then the stabilised states
    are composed over the earlier chunks in log space (`cp.compose`), starting from the model's empty state (C, n, m = 0):
    m' = max(m + F_j, m_j), C' = exp(m + F_j - m') C + exp(m_j - m') C_j. Since max and + commute, the
    composed m equals the one-process m, which matters: eps enters the denominator at the scale exp(-m).

    As in `forward`, autograd keeps q, k, v, o and the gates' pre-activations and nothing of the fp32 gates,
    the chunked mLSTM's internals or the norm: each chunk's own memory, its total forget gate and the run from
    the composed memory with the norm and output gate are three `recompute` regions; only the composition
    over the ranks (`cp.compose`, [B, H, Dqk, Dv] states) runs outside them, so no collective runs in the
    backward's recomputation. (Until then this form kept the fp32 gates, the norm's work and the chunks' start
    states: +24% over an mLSTM rank's activations at cp = 2.)"""
    q, k, v, i, f = module._projections(u)  # [B, T, H, Dqk|Dv], the gates' pre-activations [B, T, H]
    o = module.ogate_preact(u)  # [B, T, V]
    Bsz, _, H, Dk = q.shape
    Dv = v.shape[-1]
    work = torch.float64 if i.dtype == torch.float64 else torch.float32
    run, cfg = module.kernels.mlstm_chunked, module.cfg
    dev = u.device  # the regions' functions close over this, not over u (their nodes would keep u alive)

    def own_memory(q, k, v, i, f):  # each chunk alone, from an empty memory with m = -inf -> [B, H, Dk*Dv + Dk + 1]
        i, log_f = module._gates(i, f)  # [B, T, H]
        fresh = ops_mlstm.MlstmState(C=torch.zeros(Bsz, H, Dk, Dv, dtype=work, device=dev),
                                     n=torch.zeros(Bsz, H, Dk, dtype=work, device=dev),
                                     m=torch.full((Bsz, H), float("-inf"), dtype=work, device=dev))
        _, last = run(q, k, v, i, log_f, chunk=cfg.chunk, state=fresh, eps=cfg.eps)
        return torch.cat([last.C.flatten(-2), last.n, last.m[..., None]], dim=-1)  # one tensor: one region

    def total_forget(i, f):  # F_j, the sum of the chunk's log forget gates [B, H]
        return module._gates(i, f)[1].sum(1)

    own = recompute(own_memory, q, k, v, i, f)  # [B, H, Dk*Dv + Dk + 1]
    C_own, n_own, m_own = own.split([Dk * Dv, Dk, 1], dim=-1)
    B = Bsz // cp.pieces  # sequences: every chunk's own writing is composed in sequence order

    def step(state, C_j, n_j, m_j, F_j):  # the stabilised memory after chunk j, from the one before it
        C, n, m = state
        decayed = m + F_j  # [B, H]
        m_new = torch.maximum(decayed, m_j)
        old, new = torch.exp(decayed - m_new), torch.exp(m_j - m_new)  # [B, H]
        return (old[..., None, None] * C + new[..., None, None] * C_j, old[..., None] * n + new[..., None] * n_j,
                m_new)

    empty = (torch.zeros(B, H, Dk, Dv, dtype=work, device=dev), torch.zeros(B, H, Dk, dtype=work, device=dev),
             torch.zeros(B, H, dtype=work, device=dev))  # the model's empty state (C, n, m = 0)
    parts = (C_own.unflatten(-1, (Dk, Dv)), n_own, m_own[..., 0], recompute(total_forget, i, f))
    C, n, m = cp.compose(empty, parts, step)  # [p*B, ...] each
    norm = module.multihead_norm
    params = (local(norm.weight), None if norm.bias is None else local(norm.bias))

    def gated(q, k, v, i, f, o, weight, bias, C, n, m):  # from the carried memory -> out_proj's input [B, T, V]
        return module._core(q, k, v, i, f, o, weight, bias, state=ops_mlstm.MlstmState(C, n, m))[0]

    y = recompute(gated, q, k, v, i, f, o, *params, C, n, m)  # [B, T, V]
    return module.out_proj(y)  # [B, T, d]


def tp_plan(cfg: MlstmConfig, tp: int) -> dict:
    """Heads split over tp: q, k, v, the output gate and both gate pre-activations column-wise (each rank's
    H/t heads, biases with them), the per-head norm's channels with their heads, out_proj row-wise (one
    all-reduce). Every head's recurrence is its own, so nothing else crosses ranks."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if cfg.heads % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the mlstm's {cfg.heads} heads")
    plan = {name: ColwiseParallel() for name in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact")}
    return plan | {"multihead_norm": shard_parameters(0), "out_proj": RowwiseParallel()}


KIND = RuntimeKind(
    name="mlstm",
    module=Mlstm,
    build=Mlstm,
    new_cache=new_cache,
    ops={"mlstm_chunked": ops_mlstm.mlstm_chunked, "mlstm_step": ops_mlstm.mlstm_step},
    oracles={"mlstm_chunked": _mlstm_oracle},
    state_names=state_names,
    outputs=outputs,
    trace_loops=chunk_loops,
    cp_inference=cp_passed,
    cp_forward=cp_forward,
    tp_plan=tp_plan,
)
