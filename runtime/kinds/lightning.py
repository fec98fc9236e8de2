"""Lightning attention sub-layer (MiniMax-01), as transformers' MiniMaxLightningAttention computes it.

    q, k, v = act(qkv_proj(u)).reshape(B, T, H, 3D).split(D)     [B,T,H,D] each
    o, S = lightning_attention(q, k, v, slopes)                  decayed linear attention, S [B,H,D,D]
    o = rmsnorm(o.reshape(B, T, HD)) * sigmoid(output_gate(u))   (no gate without `gate`)
    out_proj(o) -> [B,T,d]

The slopes [H] are MiniMax's (runtime/ops_lightning.py `minimax_slopes`), scaled by the sub-layer's place
in the stack with `depth_decay`: the kind is `placed`, so the model passes `place` (depth among the
stack's sequence mixers, as MiniMax's layer_idx) at build. They are a non-persistent buffer, not a
parameter. With a cache the state S carries over; `step` is the one-token recurrence.

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, its `LinearState` allocation (S in fp32,
or a wider state dtype), the kernel ops it calls (lightning_attention, lightning_step) and its parameter names
(transformers': qkv_proj, output_gate, norm, out_proj).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.lightning import LightningConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_lightning
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.kinds import LayerPlace, RuntimeKind, TensorParallelUnsupported, chunk_loops, cp_passed
from ltmdsl.runtime.norm import RMSNorm
from ltmdsl.runtime.tensor_parallel import mark_tp, rmsnorm_over_tp, shard_parameters, tp_size

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels

ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@dataclass
class LinearState(LayerCache):
    """The linear-attention state S [B, H, D, Dv], in fp32 or a wider state dtype (`new_cache`)."""

    component: ClassVar[str] = "recurrent_state"
    kv: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kv,)


def new_cache(cfg: LightningConfig, req: CacheRequest) -> LinearState:
    """A zeroed state [B, H, D, D] in fp32, or in the requested state dtype where it is wider (fp64): a
    decayed running sum whose slow heads lose their per-token updates to bf16 rounding (the memory facet,
    ltmdsl.kinds.lightning.state_dtype, counts the same bytes)."""
    dtype = torch.promote_types(req.state_dtype, torch.float32)
    H = req.per_rank(cfg.heads, "heads")  # H / t on a tensor-parallel rank
    return LinearState(torch.zeros(req.batch_size, H, cfg.head_dim, cfg.head_dim, dtype=dtype,
                                   device=req.device))  # [B, H, D, Dv]


def outputs(cfg: LightningConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): out_proj reads norm(o) (times its output gate): normalised."""
    return {"out_proj.weight": True}


def state_names(cfg: LightningConfig) -> tuple[str, ...]:
    """The parameters a `Lightning` owns (transformers' MiniMaxLightningAttention names)."""
    return ("qkv_proj.weight", "out_proj.weight", "norm.weight") + (("output_gate.weight",) if cfg.gate else ())


def slopes(cfg: LightningConfig, place: LayerPlace) -> torch.Tensor:
    """The decay slopes s [H] (float64) of this layer: MiniMax's, depth-scaled with `depth_decay`."""
    if cfg.depth_decay:
        return ops_lightning.minimax_slopes(cfg.heads, place.depth, place.depths)
    return (2.0 ** (-8.0 / cfg.heads)) ** torch.arange(1, cfg.heads + 1, dtype=torch.float64)


def _lightning_oracle(q, k, v, slope, *, chunk, state):
    """The token-loop oracle behind the block op's signature (the oracle has no block length)."""
    return ops_lightning.lightning_attention_reference(q, k, v, slope, state=state)


class Lightning(nn.Module):
    """forward(u [B,T,d], state: LinearState | None, pos0) -> [B,T,d]; step(u [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: LightningConfig, d: int, eps: float, kernels: "Kernels", *, place: LayerPlace):
        super().__init__()
        self.cfg, self.kernels, self.place = cfg, kernels, place
        HD = cfg.inner
        self.qkv_proj = nn.Linear(d, 3 * HD, bias=False)
        self.output_gate = nn.Linear(d, HD, bias=False) if cfg.gate else None
        self.norm = RMSNorm(HD, cfg.norm_eps)
        self.out_proj = nn.Linear(HD, d, bias=False)
        self.register_buffer("slopes", slopes(cfg, place), persistent=False)  # [H], computed, never learned

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Projections normal(0, 0.02) as every linear here, the norm weight 1; the slopes are fixed."""
        init.linear_(self.qkv_proj, gen)
        if self.output_gate is not None:
            init.linear_(self.output_gate, gen)
        init.ones_(self.norm.weight)
        init.linear_(self.out_proj, gen)

    def _apply(self, fn, recurse=True):
        """Keep the slopes in float64 whatever dtype the module is cast to (they enter every decay)."""
        out = super()._apply(fn, recurse)
        self.slopes = slopes(self.cfg, self.place).to(self.qkv_proj.weight.device)
        return out

    def local_slopes(self) -> torch.Tensor:
        """The decay slopes [H] of the heads this module runs: all, or this tp rank's H/t (tp_plan)."""
        t = tp_size(self)
        if t == 1:
            return self.slopes
        n = self.cfg.heads // t
        r = self.tp_mesh.get_local_rank()
        return self.slopes[r * n:(r + 1) * n]  # [H/t]

    def _qkv(self, u: torch.Tensor):
        """u [..., d] -> q, k, v [..., H, D] after the activation, split per head as MiniMax lays them out
        (H/t heads on a tp rank)."""
        cfg = self.cfg
        qkv = ACT[cfg.act](self.qkv_proj(u))  # [..., 3HD]
        return qkv.unflatten(-1, (-1, 3 * cfg.head_dim)).split(cfg.head_dim, dim=-1)

    def _finish(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """o [..., H, D] -> out_proj(norm(o) * sigmoid(gate(u))) [..., d]. The norm spans all heads: on a
        tp rank its sum of squares is summed over the ranks."""
        o = o.flatten(-2)  # [..., HD] (HD/t on a tp rank)
        if tp_size(self) > 1:
            o = rmsnorm_over_tp(o, self.norm.weight, self.norm.eps, self.tp_mesh)
        else:
            o = self.norm(o)
        if self.output_gate is not None:
            o = torch.sigmoid(self.output_gate(u)) * o
        return self.out_proj(o)

    def forward(self, u: torch.Tensor, state: LinearState | None = None, pos0: int = 0) -> torch.Tensor:
        q, k, v = self._qkv(u)  # [B, T, H, D] each
        o, h = self.kernels.lightning_attention(q, k, v, self.local_slopes(), chunk=self.cfg.chunk,
                                                state=None if state is None else state.kv)  # [B,T,H,D], [B,H,D,D]
        del q, k, v  # released before the output norm, which reads o only
        if state is not None:
            state.kv.copy_(h)
        del h
        return self._finish(o, u)  # [B, T, d]

    def step(self, u: torch.Tensor, state: LinearState, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing the state in place."""
        q, k, v = self._qkv(u)  # [B, H, D] each
        o = self.kernels.lightning_step(q, k, v, self.local_slopes(), state.kv)  # [B, H, D]
        return self._finish(o, u)


def cp_forward(module: Lightning, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's tokens u [B, T/cp, d]: the block form runs twice, from a zero state to
    get this rank's final state, then from the state the earlier ranks carry into it; each head's state
    decays by exp(-s_h) a token, so over the rank's n tokens by exp(-s_h n) (`cp.carry`): exact."""
    q, k, v = module._qkv(u)  # [B, T, H, D] each
    B, T = u.shape[:2]
    slopes = module.local_slopes()  # [H]
    _, h = module.kernels.lightning_attention(q, k, v, slopes, chunk=module.cfg.chunk, state=None)
    decay = torch.exp(-slopes * T).to(h.dtype)[None, :, None, None]  # [1, H, 1, 1]
    start = cp.carry(h, decay.expand(B, -1, -1, -1))  # [B, H, D, D]
    o, _ = module.kernels.lightning_attention(q, k, v, slopes, chunk=module.cfg.chunk, state=start)
    return module._finish(o, u)  # [B, T, d]


def tp_plan(cfg: LightningConfig, tp: int) -> dict:
    """Heads split over tp: qkv_proj column-wise (MiniMax lays q, k, v out per head, so a rank's heads are one
    block of rows), the output gate column-wise, each rank's slopes those of its heads, the norm's weight by
    channels with its sum of squares summed over the ranks (it spans all heads), out_proj row-wise (one
    all-reduce)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if cfg.heads % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the lightning's {cfg.heads} heads")
    plan = {"": mark_tp(), "qkv_proj": ColwiseParallel(), "norm": shard_parameters(0), "out_proj": RowwiseParallel()}
    return plan | ({"output_gate": ColwiseParallel()} if cfg.gate else {})


KIND = RuntimeKind(
    name="lightning",
    module=Lightning,
    build=Lightning,
    new_cache=new_cache,
    ops={"lightning_attention": ops_lightning.lightning_attention, "lightning_step": ops_lightning.lightning_step},
    oracles={"lightning_attention": _lightning_oracle},
    state_names=state_names,
    outputs=outputs,
    trace_loops=chunk_loops,
    cp_inference=cp_passed,
    cp_forward=cp_forward,
    placed=True,
    tp_plan=tp_plan,
)
