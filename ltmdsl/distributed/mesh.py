"""The device mesh of a plan: ranks arranged as (pp, dp, cp, tp), pipeline stages outermost, tp innermost so a tensor-parallel group is
neighbouring ranks (on one node, where its frequent all-reduces are cheapest), then cp, as Megatron
orders them. Weights are replicated over dp and cp alike, so gradients are averaged (and ZeRO state
sharded) over the flattened dp x cp "replica" mesh."""

from __future__ import annotations

from ltmdsl.ir import ParallelPlan

MESH_DIMS = ("pp", "dp", "cp", "tp")


def device_mesh(plan: ParallelPlan, device_type: str = "cpu"):
    """A 4-D DeviceMesh ("pp", "dp", "cp", "tp") of shape (pp, dp, cp, tp) over the process group."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (plan.pp, plan.dp, plan.cp, plan.tp), mesh_dim_names=MESH_DIMS)


def replica_mesh(mesh, plan: ParallelPlan):
    """The ranks holding the same weights (dp x cp, flattened): gradient averaging and ZeRO sharding."""
    return mesh["dp"] if plan.cp == 1 else mesh["dp", "cp"]._flatten("dp_cp")


def device_type() -> str:
    """"cuda" when this process has a GPU (NCCL runs), else "cpu" (gloo)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
