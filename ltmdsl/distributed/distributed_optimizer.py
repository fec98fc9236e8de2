"""ZeRO-1 as Megatron-LM's distributed optimizer: optimizer state sharded over the replicas, gradients
all-reduced, updated weights all-gathered.

    opt = DistributedOptimizer(model.parameters(), replica_group, lr=1e-3)   # or parameter groups
    ... backward; sync_gradients (every replica holds the averaged gradient) ...
    opt.step()                                                               # then every rank's weights agree

The rank's local parameters (a DTensor's local shard under tensor parallelism, each stage's own under pipeline
parallelism) are laid end to end in one flat index of P elements, cut into N contiguous shards of
S = ceil(P/N) elements (Megatron's contiguous grad-buffer split, Rajbhandari et al. 2020, ZeRO stage 1).
Rank r keeps AdamW state only for elements [r*S, (r+1)*S): each parameter it touches contributes a view of its
flattened storage, and an inner `torch.optim.AdamW` steps those views in place (AdamW is element-wise, so
stepping pieces is stepping the whole). The shards then travel by one all-gather of N*S elements, and every
rank copies the whole flat back into its parameters. Per rank the optimizer state is S*o bytes: P*o/N exactly
when N divides P, as the memory model predicts.

Unlike torch's ZeroRedundancyOptimizer, which assigns whole parameters to ranks (so one rank's state is only
near P*o/N, and it cannot broadcast DTensor parameters), this works on any local tensors, so it runs under
tensor and pipeline parallelism alike. Parameter groups keep their own hyper-parameters (a piece goes to its
parameter's group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (sharing its storage), or t itself, detached."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach()


@dataclass(frozen=True)
class Piece:
    """The elements [start, stop) of one parameter's flattened local tensor that this rank's optimizer owns."""

    param: torch.Tensor  # the parameter (a DTensor or a plain tensor)
    start: int
    stop: int
    view: torch.Tensor  # [stop - start] view of the parameter's local storage, stepped in place


class DistributedOptimizer:
    """AdamW with its state sharded contiguously over `group` (module docstring)."""

    def __init__(self, params, group, *, optimizer_class=torch.optim.AdamW, **defaults):
        import torch.distributed as dist

        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.params: list[torch.Tensor] = [p for g in groups for p in g["params"]]
        for p in self.params:
            if not _local(p).is_contiguous():
                raise ValueError("the distributed optimizer needs contiguous parameters")
        dtypes = {_local(p).dtype for p in self.params}
        if len(dtypes) > 1:
            raise ValueError(f"the distributed optimizer's flat buffer holds one dtype, got {sorted(map(str, dtypes))}")
        self.numel = sum(_local(p).numel() for p in self.params)  # P: this rank's local elements
        self.shard = math.ceil(self.numel / self.size)  # S
        lo, hi = self.rank * self.shard, min((self.rank + 1) * self.shard, self.numel)
        self.pieces: list[Piece] = []
        inner_groups = []
        offset = 0
        for g in groups:
            pieces = []
            for p in g["params"]:
                n = _local(p).numel()
                a, b = max(lo, offset), min(hi, offset + n)
                if a < b:
                    flat = _local(p).view(-1)  # [n], the parameter's storage
                    pieces.append(Piece(p, a - offset, b - offset, flat[a - offset:b - offset]))
                offset += n
            self.pieces += pieces
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [x.view for x in pieces]})
        # a rank owning nothing of a group still keeps the group (same param_groups on every rank)
        self.optim = optimizer_class(inner_groups, **defaults)

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's pieces (gradients already averaged over the group), then the all-gather."""
        import torch.distributed as dist

        for x in self.pieces:
            grad = x.param.grad
            x.view.grad = None if grad is None else _local(grad).reshape(-1)[x.start:x.stop]  # [stop - start]
        self.optim.step()
        for x in self.pieces:
            x.view.grad = None
        if self.size == 1:
            return
        first = _local(self.params[0])
        mine = torch.zeros(self.shard, dtype=first.dtype, device=first.device)  # [S]: this rank's updated elements, padded
        fill = 0
        for x in self.pieces:
            mine[fill:fill + x.view.numel()] = x.view
            fill += x.view.numel()
        shards = [torch.empty_like(mine) for _ in range(self.size)]  # N x [S]
        dist.all_gather(shards, mine, group=self.group)
        flat = torch.cat(shards)  # [N*S]: every rank's updated elements in flat order
        offset = 0
        for p in self.params:
            local = _local(p).view(-1)  # [n]
            local.copy_(flat[offset:offset + local.numel()])
            offset += local.numel()
