"""The device mesh of a plan: ranks arranged as (dp, tp), tp innermost so a tensor-parallel group is
neighbouring ranks (on one node, where its frequent all-reduces are cheapest), as Megatron orders them."""

from __future__ import annotations

from ltmdsl.ir import ParallelPlan

MESH_DIMS = ("dp", "tp")


def device_mesh(plan: ParallelPlan, device_type: str = "cpu"):
    """A 2-D DeviceMesh ("dp", "tp") of shape (plan.dp, plan.tp) over the current process group."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (plan.dp, plan.tp), mesh_dim_names=MESH_DIMS)


def device_type() -> str:
    """"cuda" when this process has a GPU (NCCL runs), else "cpu" (gloo)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
