"""Context parallelism for hybrids: the sequence split over cp ranks, each mixer exact across the cut.

The split (`ParallelPlan.cp_split`):

    balanced    (default) the sequence cut into 2*cp chunks, rank r holding chunks r and 2cp-1-r (Megatron-LM's
                and Llama 3's load-balanced causal split): under causal attention every rank attends over the
                same number of (query, key) pairs, where a contiguous split leaves the last rank the most work
    contiguous  rank r holds positions [r*T/cp, (r+1)*T/cp)

Both are exact for every kind. A rank's tokens are its pieces (one or two chunks, in sequence order within
each); `apply_context_parallel` makes each mixer's forward its kind's `cp_forward` (runtime/kinds/<kind>.py)
on the pieces folded into the batch, x [B, 2c, d] -> [2B, c, d] (rows of piece p at p*B), so a kind's
token-local work and its scans "from a zero state" run on each chunk alone, unchanged, and the collectives
below put the chunks back in sequence order. LTModel.forward and loss run unchanged on a rank's tokens, and
FSDP's and DTensor's module hooks still fire around every mixer (cp composes with ZeRO 2/3 and tensor
parallelism):

    offsets(c)            each piece's first position (pieces hold c tokens)
    positions(rows, c)    the position of every token of the folded rows [rows, c]
    gather(t)             every chunk of t [pB, c, ...] in sequence order -> [B, T, ...] (global attention's K/V)
    previous_tail(t, n)   the last n tokens of the chunk before each piece (a convolution's K-1 halo)
    causal_conv(...)      a depthwise causal conv continuing from previous_tail's K-1 halo
    compose(start, ...)   the state entering each piece of a recurrence, stepped over the chunks before it
                          from every chunk's zero-start summary (a scan over the 2*cp chunks)
    carry(h, decay)       compose for S_t = a_t S_{t-1} + u_t: from each chunk's zero-start final state h and
                          total decay
    carry_linear(h, m)    the same with matrix transitions (the delta rule's (I - beta k k^T) diag(exp g))

All are autograd all-gathers (torch.distributed functional collectives), so gradients cross ranks in
backward, and every rank keeps what it received in its graph (a rank that does not use its gather would
skip the matching collective in backward and leave its peers waiting). A kind without `cp_forward` is
refused naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ltmdsl.distributed.plan import CP_SPLITS
from ltmdsl.runtime.kinds import runtime_kind
from ltmdsl.runtime.tensor_parallel import tp_local


class ContextParallelUnsupported(ValueError):
    """A kind with no context-parallel form (the message names it)."""


def chunk_ids(rank: int, size: int, split: str) -> tuple[int, ...]:
    """The sequence chunks rank `rank` of `size` holds, in the order of its tokens: (r, 2cp-1-r) balanced,
    (r,) contiguous."""
    if split not in CP_SPLITS:
        raise ValueError(f"cp_split must be one of {CP_SPLITS}, got {split!r}")
    return (rank, 2 * size - 1 - rank) if split == "balanced" else (rank,)


@dataclass(frozen=True)
class ContextShard:
    """This rank's place among the cp ranks (the chunks it holds) and the collectives of its group."""

    mesh: object  # 1-D DeviceMesh of the cp ranks
    rank: int
    size: int
    split: str = "contiguous"

    @property
    def chunks(self) -> tuple[int, ...]:
        """The sequence chunks this rank holds, one per piece."""
        return chunk_ids(self.rank, self.size, self.split)

    @property
    def pieces(self) -> int:
        return len(self.chunks)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """A rank's tokens x [B, p*c, ...] -> its pieces as batch rows [p*B, c, ...] (piece q at rows q*B)."""
        return torch.cat(x.chunk(self.pieces, dim=1), dim=0) if self.pieces > 1 else x

    def unfold(self, y: torch.Tensor) -> torch.Tensor:
        """fold's inverse: [p*B, c, ...] -> [B, p*c, ...]."""
        return torch.cat(y.chunk(self.pieces, dim=0), dim=1) if self.pieces > 1 else y

    def offsets(self, tokens: int) -> tuple[int, ...]:
        """Each piece's first position when every chunk holds `tokens`."""
        return tuple(k * tokens for k in self.chunks)

    def positions(self, rows: int, tokens: int, device=None) -> torch.Tensor:
        """The position of every token of the folded rows [rows, tokens] (rows = pieces * B)."""
        per = torch.tensor(self.offsets(tokens), device=device).repeat_interleave(rows // self.pieces)  # [rows]
        return per[:, None] + torch.arange(tokens, device=device)  # [rows, tokens]

    def _in_order(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's pieces of t [p*B, ...] -> [B, 2cp (or cp), ...], chunk k at index k (autograd)."""
        from torch.distributed._functional_collectives import all_gather_tensor_autograd

        every = all_gather_tensor_autograd(t[:, None].contiguous(), gather_dim=1, group=self.mesh)  # [pB, cp, ...]
        by_piece = every.chunk(self.pieces, dim=0)  # p x [B, cp, ...]: piece q of every rank
        if self.pieces == 1:
            return by_piece[0]
        return torch.cat([by_piece[0], by_piece[1].flip(1)], dim=1)  # chunks 0..cp-1, then cp..2cp-1

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every chunk of t [p*B, c, ...] in sequence order -> [B, T, ...] (autograd: grads reduce-scattered)."""
        return self._in_order(t).flatten(1, 2)

    def previous_tail(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The last n tokens of the chunk before each piece of t [p*B, c, ...] (zeros before chunk 0) ->
        [p*B, n, ...]."""
        if n > t.shape[1]:
            raise ValueError(f"a halo of {n} tokens is longer than a context-parallel chunk of {t.shape[1]}: "
                             "use a smaller cp (or the contiguous split, whose chunks are twice as long)")
        every = self._in_order(t[:, -n:])  # [B, chunks, n, ...]
        keep = 0 * every.sum()  # the gather stays in this rank's graph even where no piece reads it
        halos = [torch.zeros_like(every[:, 0]) + keep if k == 0 else every[:, k - 1] for k in self.chunks]
        return torch.cat(halos, dim=0)  # [p*B, n, ...]

    def causal_conv(self, kernels, x: torch.Tensor, conv, *, silu: bool) -> torch.Tensor:
        """The depthwise causal conv (nn.Conv1d `conv`, K taps) of this rank's x [p*B, c, C], each piece
        continuing from the previous chunk's last K-1 inputs (its halo): what one process computes there."""
        K = conv.weight.shape[-1]
        prev = self.previous_tail(x, K - 1).transpose(1, 2) if K > 1 else None  # [pB, C, K-1]
        weight, bias = tp_local(conv, "weight")[:, 0], tp_local(conv, "bias")  # [C, K], [C] (tp: this rank's)
        return kernels.causal_conv1d(x, weight, bias, prev=prev, silu=silu)  # [pB, c, C]

    def compose(self, start, parts: tuple[torch.Tensor, ...], step: Callable):
        """The state entering each of this rank's pieces of a recurrence, from the chunks before it.

        `start` is the state before position 0 (a tensor or a tuple of tensors [B, ...]); `parts` are every
        piece's summaries of its own chunk (tensors [p*B, ...], e.g. its zero-start final state and total
        decay), gathered in sequence order; `step(state, *parts of chunk k)` is the state after chunk k.
        Returns the entering states folded as the pieces, [p*B, ...] (a tuple like `start`)."""
        gathered = [self._in_order(t) for t in parts]  # each [B, chunks, ...]
        keep = 0 * sum(g.sum() for g in gathered)  # every gather stays in this rank's graph
        single = not isinstance(start, tuple)
        state = (start,) if single else tuple(start)
        state = (state[0] + keep,) + state[1:]
        entering: dict[int, tuple] = {}
        for k in range(max(self.chunks) + 1):
            entering[k] = state
            if k < max(self.chunks):
                out = step(state[0] if single else state, *(g[:, k] for g in gathered))
                state = (out,) if single else tuple(out)
        picked = [entering[k] for k in self.chunks]
        result = tuple(torch.cat(parts_, dim=0) for parts_ in zip(*picked))  # [p*B, ...] each
        return result[0] if single else result

    def carry_linear(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """State entering each piece of a recurrence with matrix transitions, S_t = A_t S_{t-1} + U_t (the
        delta rule): h [p*B, ..., Dk, Dv] is each piece's final state started from zero, m [p*B, ..., Dk, Dk]
        its composed transition A_n ... A_1, so the state leaving chunk j is m_j S + h_j. Zeros before chunk 0."""
        zero = torch.zeros_like(h.chunk(self.pieces, dim=0)[0])  # [B, ..., Dk, Dv]
        return self.compose(zero, (h, m), lambda s, h_j, m_j: m_j @ s + h_j)

    def carry(self, h: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        """State entering each piece: sum over earlier chunks j of (prod of decays of chunks j+1..k-1) h_j.

        h [p*B, ...] is each piece's final state started from zero; decay [p*B, ...] (broadcastable to h)
        the product of its per-token decays. Zeros before chunk 0 (still in the graph)."""
        zero = torch.zeros_like(h.chunk(self.pieces, dim=0)[0])  # [B, ...]
        return self.compose(zero, (h, decay), lambda s, h_j, d_j: s * d_j + h_j)


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


def apply_context_parallel(model, cp_mesh, split: str = "balanced") -> None:
    """Make every mixer of `model` run its kind's cp_forward on this rank's tokens, split as `split` says
    (ContextParallelUnsupported naming the first kind without one). The model then takes this rank's
    [B, T/cp] tokens (`shard_sequence`); caches are refused."""
    shard = ContextShard(cp_mesh, cp_mesh.get_local_rank(), cp_mesh.size(), split)
    done: set[int] = set()
    for block, fwd in zip(model.layers, cp_forwards(model.ir)):
        if id(block) not in done:  # tied blocks: one module
            done.add(id(block))
            block.mixer.forward = _cp_call(block.mixer, fwd, shard)


def _cp_call(module, fwd, shard: ContextShard):
    def forward(x: torch.Tensor, state=None, pos0: int = 0, **use) -> torch.Tensor:
        if state is not None or pos0:
            raise ValueError("a context-parallel model runs whole training sequences: no cache, pos0 = 0")
        # use: a sub-layer's own parameters (RuntimeKind.new_use); the kind sees [p*B, c, d]
        return shard.unfold(fwd(module, shard.fold(x), shard, **use))  # [B, T/cp, d]

    return forward


def shard_sequence(t: torch.Tensor, rank: int, size: int, split: str = "balanced") -> torch.Tensor:
    """Rank `rank`'s tokens of t [B, T, ...] -> [B, T/size, ...]: its chunks of T/(2*size) (balanced) or
    T/size (contiguous) tokens, in the order the model folds them."""
    ids = chunk_ids(rank, size, split)
    pieces = len(ids) * size
    if t.shape[1] % pieces:
        raise ValueError(f"cp = {size} with the {split} split cuts the sequence into {pieces} chunks: {pieces} "
                         f"does not divide the sequence of {t.shape[1]} tokens")
    n = t.shape[1] // pieces
    return torch.cat([t[:, k * n:(k + 1) * n] for k in ids], dim=1)
