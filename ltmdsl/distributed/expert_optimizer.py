"""ZeRO 1 under expert parallelism: the distributed optimizer twice, dense and expert parameters each sharded
over the ranks that hold them (Megatron-LM's distributed optimizer with expert data parallelism).

    opt = ExpertDataParallelOptimizer(groups, expert_ids, dense_group, expert_group, lr=1e-3)

Dense parameters are replicated over the dp x cp ranks, so their AdamW state is cut into dp*cp contiguous
shards over those ranks; an expert parameter exists only on the edp x cp ranks holding its experts
(expert_parallel.py), so its state is cut over those, dp*cp/ep of them. One flat index over both would give a
rank state for elements it does not hold. Each half is `DistributedOptimizer` (a plain AdamW when its group is
one rank); parameter groups keep their hyper-parameters (a group's dense and expert parameters each go to their
half, a half keeping the groups it has parameters of).
"""

from __future__ import annotations

import torch

from ltmdsl.distributed.distributed_optimizer import DistributedOptimizer


def _half(groups: list[dict], group, **defaults):
    """The distributed optimizer over `group` (AdamW when it is one rank) for `groups`; None for no groups."""
    import torch.distributed as dist

    if not groups:
        return None
    if dist.get_world_size(group) == 1:
        return torch.optim.AdamW(groups, **defaults)
    return DistributedOptimizer(groups, group, **defaults)


class ExpertDataParallelOptimizer:
    """AdamW whose dense and expert states are sharded over their own replica groups (module docstring)."""

    def __init__(self, params, expert_ids: set[int], dense_group, expert_group, **defaults):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        dense, expert = [], []
        for g in groups:
            rest = {k: v for k, v in g.items() if k != "params"}
            for out, mine in ((dense, False), (expert, True)):
                ps = [p for p in g["params"] if (id(p) in expert_ids) == mine]
                if ps:
                    out.append({**rest, "params": ps})
        # every rank holds the same groups of both halves (same model, same classes), so the collectives match
        self.halves = [h for h in (_half(dense, dense_group, **defaults), _half(expert, expert_group, **defaults))
                       if h is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for h in self.halves for g in h.param_groups]

    @property
    def state(self) -> dict:
        """Both halves' per-parameter state (their keys are distinct tensors)."""
        return {k: v for h in self.halves for k, v in h.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for h in self.halves:
            h.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """Each half steps its shard and gathers its own parameters (gradients already averaged)."""
        for h in self.halves:
            h.step()
