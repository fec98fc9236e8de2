"""Expert parallelism: each MoE layer's experts split over the ep ranks, tokens sent to them all-to-all.

The ep ranks are the data-parallel ranks (ep = dp): rank r holds experts [r*E/ep, (r+1)*E/ep) of every
MoE layer (its expert weights are DTensors sharded on the expert axis, initialised shard by shard like
every other parameter) and the router whole. In forward each rank routes its own tokens, sends each
(token, slot) to the rank holding its expert (all_to_all with uneven splits), runs its experts on what
it receives, and sends the results back, where they are weighted and summed as in one process
(`ep_forward` on the moe runtime kind). Both all-to-alls are autograd functions, so an expert's gradient
collects every rank's tokens; it is divided by dp, not all-reduced (no other rank holds that expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertShard:
    """This rank's place among the ep ranks and the token exchange of ep_forward."""

    mesh: object  # 1-D DeviceMesh of the ep ranks
    rank: int
    size: int

    def local(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a stacked expert weight [E, ...] -> [E/ep, ...] (differentiable)."""
        return p.to_local() if hasattr(p, "to_local") else p

    def counts(self, send: torch.Tensor) -> torch.Tensor:
        """How many rows each rank sends here, given how many this rank sends to each: [ep] -> [ep]."""
        import torch.distributed as dist

        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.mesh.get_group())
        return recv

    def exchange(self, t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows of t [sum(send), ...] to their ranks -> the rows sent here [sum(recv), ...] (autograd)."""
        from torch.distributed.nn.functional import all_to_all_single

        out = t.new_empty((sum(recv), *t.shape[1:]))
        return all_to_all_single(out, t.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                                 group=self.mesh.get_group())

    def exchange_ids(self, t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """As `exchange` for integer ids (no gradient)."""
        import torch.distributed as dist

        out = t.new_empty(sum(recv))
        dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=self.mesh.get_group())
        return out


def apply_expert_parallel(model, ep_mesh) -> set[int]:
    """Shard the stacked expert weights of every MoE mixer over `ep_mesh` (meta model: before
    materialise) and switch the mixers to ep_forward; returns the ids of the sharded parameters."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from ltmdsl.runtime.kinds import runtime_kind

    shard = ExpertShard(ep_mesh, ep_mesh.get_local_rank(), ep_mesh.size())
    sharded: set[int] = set()
    done: set[int] = set()
    for layer, block in zip(model.ir.layers, model.layers):
        kind = runtime_kind(layer.kind)
        if getattr(kind, "ep_forward", None) is None or id(block) in done:
            continue
        done.add(id(block))
        experts = block.mixer.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = getattr(experts, name)
            if p is None:
                continue
            d = torch.nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None))
            setattr(experts, name, d)
            sharded.add(id(d))
        block.mixer.expert_parallel = shard
    return sharded
