"""Data parallelism and ZeRO: how each `zero` stage of a plan maps onto torch.distributed.

    zero 0  replicated weights, gradients averaged over the dp ranks by an all-reduce after backward
            (what DDP does, without its bucketing), a full optimizer on every rank
    zero 1  as zero 0, optimizer state sharded: Megatron-LM's distributed optimizer (distributed_optimizer:
            the rank's parameters as one flat index cut into N contiguous shards, each rank steps its
            shard and the shards are all-gathered); under pp each stage's parameters, under tp their shards
    zero 2  FSDP2 fully_shard(reshard_after_forward=False): weights gathered once per step and kept
            gathered through backward (no second all-gather), gradients reduce-scattered, optimizer on
            the shard. At rest (between steps) FSDP2 keeps only the weight shard: it has no mode holding
            full weights while sharding gradients, so weights at rest are 1/N, not the ZeRO paper's full copy
    zero 3  FSDP2 fully_shard(reshard_after_forward=True): weights, gradients and optimizer state sharded,
            weights re-gathered for backward

FSDP2 wraps each sub-layer's mixer (one all-gather and one reduce-scatter per mixer: LTModel calls a
block's norm and mixer directly, so the mixer is the unit whose forward hooks run; under expert parallelism
a MoE's experts first, on their own replicas, the edp x cp ranks: expert_parallel.py), then the root
(embedding, the small norms, final norm, head); under pp the root is each pipeline stage, and
torch.distributed.pipelining defers the gradient reduce-scatter to the last micro-batch's backward. With tensor parallelism the dp mesh is the outer axis of a 2-D mesh and
FSDP shards the tensor-parallel shards again (FSDP2 + DTensor "2-D").
"""

from __future__ import annotations

import torch

FSDP_STAGES = (2, 3)


def apply_fsdp(model, dp_mesh, zero: int) -> None:
    """Shard `model` with FSDP2 for ZeRO stage 2 or 3 (best still on the meta device): an LTModel, one
    pipeline Stage (its mixers, then the stage as the root of its embedding, norms and head), or a rank's
    interleaved stages (`RankStages`: each of its stages so)."""
    from torch.distributed.fsdp import fully_shard

    if zero not in FSDP_STAGES:
        raise ValueError(f"FSDP2 implements ZeRO stages {FSDP_STAGES}; stage {zero} uses sync_gradients")
    roots = getattr(model, "stages", None) or [model]  # a rank's virtual pipeline stages are FSDP roots each
    reshard = zero == 3
    done: set[int] = set()
    for root in roots:
        blocks = root.layers.values() if isinstance(root.layers, torch.nn.ModuleDict) else root.layers
        for block in blocks:
            if id(block) not in done:  # tied blocks are one module, sharded once
                done.add(id(block))
                ep = getattr(block.mixer, "expert_parallel", None)
                if ep is not None:  # experts over the ranks holding the same ones (expert_parallel.py)
                    fully_shard(block.mixer.experts, mesh=ep.replicas, reshard_after_forward=reshard)
                fully_shard(block.mixer, mesh=dp_mesh, reshard_after_forward=reshard)
        # The root (embedding, norms, head) stays gathered after forward under zero 3 too: backward needs it
        # at once, and a loss that multiplies by the head weight outside forward (the chunked answer loss)
        # must see the whole weight, not its shard.
        fully_shard(root, mesh=dp_mesh, reshard_after_forward=False)


@torch.no_grad()
def sync_gradients(model, dp_mesh, dp_sharded: frozenset[int] = frozenset(), expert_replicas=None) -> None:
    """Average every gradient over the data-parallel ranks (ZeRO 0/1: replicated weights). A DTensor
    gradient (tensor parallelism) is averaged shard by shard: its dp peers hold the same shard. A
    parameter split over dp (`dp_sharded`: experts under ep, whose gradient expert_parallel scales to its
    ep group's share of the dp mean) is averaged over `expert_replicas` instead (the ranks holding the same
    experts, a 1-D mesh; None: none)."""
    import torch.distributed as dist

    n = dp_mesh.size()
    m = 1 if expert_replicas is None else expert_replicas.size()  # folded experts: edp may exceed dp*cp
    if n == 1 and m == 1:
        return
    group = dp_mesh.get_group()
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if id(p) not in dp_sharded:
            if n > 1:
                dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)  # AVG is NCCL-only; gloo sums
                g.div_(n)
        elif m > 1:
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=expert_replicas.get_group())
            g.div_(m)


def make_optimizer(model, zero: int, dp_mesh, lr: float, params=None, **adamw) -> torch.optim.Optimizer:
    """AdamW over the model's (local) parameters, or over `params` (a list of tensors or of parameter
    groups); for ZeRO 1 the distributed optimizer, its state sharded over `dp_mesh` (the replicas), under
    expert parallelism the experts' over their own replicas (expert_optimizer.py)."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    from ltmdsl.distributed.expert_parallel import expert_parameters, expert_shard

    ep = expert_shard(model)
    if zero == 1 and (dp_mesh.size() > 1 or (ep is not None and ep.replicas.size() > 1)):
        from ltmdsl.distributed.distributed_optimizer import DistributedOptimizer

        if ep is not None:  # dense and expert state each sharded over their own replicas (folded: edp)
            from ltmdsl.distributed.expert_optimizer import ExpertDataParallelOptimizer

            experts = {id(p) for p in expert_parameters(model)}
            return ExpertDataParallelOptimizer(params, experts, dp_mesh.get_group(), ep.replicas.get_group(),
                                               lr=lr, **adamw)
        return DistributedOptimizer(params, dp_mesh.get_group(), lr=lr, **adamw)
    return torch.optim.AdamW(params, lr=lr, **adamw)
