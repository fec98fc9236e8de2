"""Context parallelism for hybrids: the sequence split over cp ranks, each mixer exact across the cut.

Each cp rank holds T/cp consecutive tokens (a contiguous split: rank r has positions [r*T/cp, (r+1)*T/cp)),
runs every sub-layer on them and computes the loss of its tokens. What crosses ranks is each kind's
business, declared as `cp_forward(module, x, cp)` on its runtime kind (runtime/kinds/<kind>.py) in terms
of the `ContextShard` collectives below. `apply_context_parallel` makes each mixer's forward its
cp_forward, so LTModel.forward and loss run unchanged on a rank's tokens, and FSDP's and DTensor's module
hooks still fire around every mixer (cp composes with ZeRO 2/3 and tensor parallelism):

    gather(t)             all ranks' pieces of t [B, T/cp, ...] -> [B, T, ...] (global attention's K/V)
    previous_tail(t, n)   the last n tokens of the previous rank's t (a convolution's K-1 halo)
    causal_conv(...)      a depthwise causal conv continuing from previous_tail's K-1 halo
    carry(h, decay)       the state entering this rank of a linear recurrence S_t = a_t S_{t-1} + u_t,
                          from every rank's zero-start final state h and total decay: a scan over ranks
    carry_linear(h, m)    the same with matrix transitions (the delta rule's (I - beta k k^T) diag(exp g))

All three are autograd all-gathers (torch.distributed functional collectives), so gradients cross ranks
in backward, and every rank keeps what it received in its graph (a rank that does not use its gather
would skip the matching collective in backward and leave its peers waiting). A kind without `cp_forward`
is refused naming it. Not load-balanced: with causal attention the last rank does the most work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltmdsl.runtime.kinds import runtime_kind
from ltmdsl.runtime.tensor_parallel import local


class ContextParallelUnsupported(ValueError):
    """A kind with no context-parallel form (the message names it)."""


@dataclass(frozen=True)
class ContextShard:
    """This rank's place among the cp ranks and the collectives of its group."""

    mesh: object  # 1-D DeviceMesh of the cp ranks
    rank: int
    size: int

    def offset(self, tokens: int) -> int:
        """Position of this rank's first token when each rank holds `tokens`."""
        return self.rank * tokens

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, T/cp, ...] from every rank -> [B, T, ...] in rank order (autograd: grads reduce-scattered)."""
        from torch.distributed._functional_collectives import all_gather_tensor_autograd

        return all_gather_tensor_autograd(t.contiguous(), gather_dim=1, group=self.mesh)

    def previous_tail(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The last n tokens of the previous rank's t [B, T/cp, ...] (zeros on rank 0) -> [B, n, ...]."""
        every = self.gather(t[:, -n:])  # [B, cp*n, ...]
        if self.rank == 0:
            return torch.zeros_like(t[:, :n]) + 0 * every.sum()  # keep the gather in this rank's graph
        return every[:, (self.rank - 1) * n:self.rank * n]

    def causal_conv(self, kernels, x: torch.Tensor, conv, *, silu: bool) -> torch.Tensor:
        """The depthwise causal conv (nn.Conv1d `conv`, K taps) of this rank's x [B, T/cp, C], continuing
        from the previous rank's last K-1 inputs (its halo): what one process computes at these positions."""
        K = conv.weight.shape[-1]
        prev = self.previous_tail(x, K - 1).transpose(1, 2) if K > 1 else None  # [B, C, K-1]
        return kernels.causal_conv1d(x, local(conv.weight)[:, 0], local(conv.bias), prev=prev, silu=silu)  # [B, T/cp, C]

    def carry_linear(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """State entering this rank of a recurrence with matrix transitions, S_t = A_t S_{t-1} + U_t (the
        delta rule): h [B, ..., Dk, Dv] is each rank's final state started from zero, m [B, ..., Dk, Dk] its
        composed transition A_n ... A_1, so the state leaving rank j is m_j S + h_j. Zeros on rank 0."""
        hs = self.gather(h[:, None])  # [B, cp, ..., Dk, Dv]
        ms = self.gather(m[:, None])  # [B, cp, ..., Dk, Dk]
        state = torch.zeros_like(h) + 0 * (hs.sum() + ms.sum())
        for j in range(self.rank):
            state = ms[:, j] @ state + hs[:, j]
        return state

    def carry(self, h: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        """State entering this rank: sum over earlier ranks j of (prod of decays of ranks j+1..r-1) h_j.

        h [B, ...] is each rank's final state started from zero; decay [B, ...] (broadcastable to h) the
        product of its per-token decays. Zeros on rank 0 (still in the graph)."""
        hs = self.gather(h[:, None])  # [B, cp, ...]
        ds = self.gather(decay[:, None])  # [B, cp, ...]
        state = torch.zeros_like(h) + 0 * (hs.sum() + ds.sum())
        for j in range(self.rank):
            state = state * ds[:, j] + hs[:, j]
        return state


def cp_forwards(ir) -> list:
    """Each sub-layer's cp_forward; ContextParallelUnsupported naming the first kind that has none."""
    out = []
    for layer in ir.layers:
        fwd = getattr(runtime_kind(layer.kind), "cp_forward", None)
        if fwd is None:
            raise ContextParallelUnsupported(
                f"no context-parallel form for kind {layer.kind!r} (layer '{layer.definition}'); run it with "
                f"cp = 1, or declare cp_forward in runtime/kinds/{layer.kind}.py")
        out.append(fwd)
    return out


def apply_context_parallel(model, cp_mesh) -> None:
    """Make every mixer of `model` run its kind's cp_forward on this rank's tokens (ContextParallelUnsupported
    naming the first kind without one). The model then takes [B, T/cp] inputs; caches are refused."""
    shard = ContextShard(cp_mesh, cp_mesh.get_local_rank(), cp_mesh.size())
    done: set[int] = set()
    for block, fwd in zip(model.layers, cp_forwards(model.ir)):
        if id(block) not in done:  # tied blocks: one module
            done.add(id(block))
            block.mixer.forward = _cp_call(block.mixer, fwd, shard)


def _cp_call(module, fwd, shard: ContextShard):
    def forward(x: torch.Tensor, state=None, pos0: int = 0, **use) -> torch.Tensor:
        if state is not None or pos0:
            raise ValueError("a context-parallel model runs whole training sequences: no cache, pos0 = 0")
        return fwd(module, x, shard, **use)  # use: a sub-layer's own parameters (RuntimeKind.new_use)

    return forward


def shard_sequence(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s tokens of t [B, T, ...] -> [B, T/size, ...]; T must divide."""
    if t.shape[1] % size:
        raise ValueError(f"cp = {size} does not divide the sequence of {t.shape[1]} tokens")
    n = t.shape[1] // size
    return t[:, rank * n:(rank + 1) * n]
