"""ltmdsl.measure.ranks: a fake-group trace leaves nothing of its group behind in the process."""

from __future__ import annotations

import torch

from ltmdsl.distributed.launch import forget_dtensor_caches
from ltmdsl.distributed.mesh import device_mesh
from ltmdsl.distributed.plan import plan_from
from ltmdsl.measure.ranks import fake_group


def _tp_zeros(mesh) -> torch.Tensor:
    from torch.distributed.tensor import Shard, distribute_tensor

    return torch.zeros_like(distribute_tensor(torch.zeros(8, 4), mesh["tp"], [Shard(0)], src_data_rank=None))


def test_a_later_group_gets_its_own_mesh_after_a_trace():
    """After tracing tp rank 0, the same plan's mesh as tp rank 1 hands DTensor ops rank 1's coordinate (was:
    the traced group's mesh from DTensor's sharding cache, coordinate 0, whose group is destroyed)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    plan = plan_from(world=2, tp=2)
    with fake_group(plan, 0) as mesh:
        assert list(_tp_zeros(mesh).device_mesh.get_coordinate()) == [0]
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        assert list(_tp_zeros(device_mesh(plan)).device_mesh.get_coordinate()) == [1]
    finally:
        dist.destroy_process_group()
        forget_dtensor_caches()
