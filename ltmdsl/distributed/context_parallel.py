"""Context parallelism for hybrids: the sequence split over cp ranks, each mixer exact across the cut.

Each cp rank holds T/cp consecutive tokens (a contiguous split: rank r has positions [r*T/cp, (r+1)*T/cp)),
runs every sub-layer on them and computes the loss of its tokens. What crosses ranks is each kind's
business, declared as `cp_forward(module, x, cp)` on its runtime kind (runtime/kinds/<kind>.py) in terms
of the `ContextShard` collectives below:

    gather(t)             all ranks' pieces of t [B, T/cp, ...] -> [B, T, ...] (global attention's K/V)
    previous_tail(t, n)   the last n tokens of the previous rank's t (a convolution's K-1 halo)
    carry(h, decay)       the state entering this rank of a linear recurrence S_t = a_t S_{t-1} + u_t,
                          from every rank's zero-start final state h and total decay: a scan over ranks

All three are autograd all-gathers (torch.distributed functional collectives), so gradients cross ranks
in backward, and every rank keeps what it received in its graph (a rank that does not use its gather
would skip the matching collective in backward and leave its peers waiting). A kind without `cp_forward`
is refused naming it. Not load-balanced: with causal attention the last rank does the most work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltmdsl.runtime.kinds import runtime_kind


class ContextParallelUnsupported(ValueError):
    """A kind with no context-parallel form (the message names it)."""


@dataclass(frozen=True)
class ContextShard:
    """This rank's place in the sequence and the collectives of its cp group."""

    mesh: object  # 1-D DeviceMesh of the cp ranks
    rank: int
    size: int
    tokens: int  # T/cp local tokens

    @property
    def offset(self) -> int:
        """Position of this rank's first token."""
        return self.rank * self.tokens

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


def cp_loss(model, input_ids: torch.Tensor, targets: torch.Tensor, cp: ContextShard) -> torch.Tensor:
    """Mean cross-entropy of this rank's tokens: input_ids, targets [B, T/cp], the model's forward with each
    mixer's cp_forward (the same residual / fused-norm structure as LTModel.forward)."""
    forwards = cp_forwards(model.ir)
    h = model.embed(input_ids)  # [B, T/cp, d]
    pending = None
    for block, fwd in zip(model.layers, forwards):
        normed, h = block.norm(h, None) if pending is None else block.norm(pending, h)
        pending = fwd(block.mixer, normed, cp)  # [B, T/cp, d]
    normed, _ = model.final_norm(pending, h)
    logits = model.head(normed)  # [B, T/cp, V]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def shard_sequence(t: torch.Tensor, cp: ContextShard) -> torch.Tensor:
    """This rank's tokens of t [B, T, ...] -> [B, T/cp, ...]."""
    return t[:, cp.offset:cp.offset + cp.tokens]
