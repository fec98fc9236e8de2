"""The launcher: N forked workers in one gloo group over a FileStore (no port), results back in rank
order, a raising or dying rank turned into a WorkerError naming it within the timeout, and the
torchrun entry refusing a process nobody launched."""

from __future__ import annotations

import os
import time

import pytest

from ltmdsl.distributed import WorkerError, init_from_env, launch
from ltmdsl.distributed.launch import forget_dtensor_caches


def _sum_of_ranks():
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item(), os.environ["RANK"]


def test_workers_form_one_group():
    assert launch(_sum_of_ranks, 2) == [(0, 2, 3.0, "0"), (1, 2, 3.0, "1")]


def _raise_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("bad shard on purpose")
    return "fine"


def test_a_raising_rank_is_named():
    with pytest.raises(WorkerError, match=r"rank 1 failed:(.|\n)*bad shard on purpose"):
        launch(_raise_on_rank_1, 2)


def _die_mid_step():
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)  # a rank dying: no error message, no collective
    dist.all_reduce(torch.ones(1))  # rank 0 waits for a peer that never comes
    return "unreachable"


def test_a_dying_rank_ends_the_run_without_a_hang():
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank (1 died without a result \(exit code 3\)|0 failed)"):
        launch(_die_mid_step, 2, timeout_s=20)
    assert time.monotonic() - start < 20


def _leave_a_fake_group_entry() -> None:
    """What an in-process tp trace (ltmdsl.measure) leaves behind: DTensor's sharding cache holding a fake
    group's 2-rank mesh, seen as rank 0."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        torch.zeros_like(distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)], src_data_rank=None))
    finally:
        dist.destroy_process_group()


def _save_sharded_zeros(path: str):
    """AdamW's first moment of a Shard(0) parameter (zeros_like), saved by DCP; its mesh coordinate here."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    moment = torch.zeros_like(distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)], src_data_rank=None))
    dcp.save({"exp_avg": moment}, checkpoint_id=path)
    return list(moment.device_mesh.get_coordinate())


def test_workers_do_not_inherit_the_parents_dtensor_meshes(tmp_path):
    """A worker forked after a fake-group trace in the parent gets DTensors on its own group's mesh: each rank
    its own coordinate, so DCP saves both halves (was: rank 1's zeros_like on the parent's mesh as rank 0,
    "invalid fill tensor-volume: 32 chunks-volume: 16")."""
    _leave_a_fake_group_entry()
    try:
        assert launch(_save_sharded_zeros, 2, (str(tmp_path / "ckpt"),)) == [[0], [1]]
    finally:
        forget_dtensor_caches()


def test_init_from_env_refuses_without_a_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(WorkerError, match="not started by torchrun"):
        init_from_env()


TORCHRUN_WORKER = """
import torch
from ltmdsl.distributed import init_from_env
rank, world = init_from_env()
t = torch.tensor([float(rank + 1)])
torch.distributed.all_reduce(t)
print(f"rank {rank} of {world}: {t.item()}")
torch.distributed.destroy_process_group()
"""


def test_torchrun_started_workers_join_from_the_environment(tmp_path):
    """The same group under torchrun (--standalone: its own rendezvous on a free port)."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rank 0 of 2: 3.0" in out.stdout and "rank 1 of 2: 3.0" in out.stdout


def test_spawned_workers_form_one_group_as_nccl_ones_do():
    """NCCL workers are spawned (a fork cannot use CUDA once the parent touched it): the same group, results
    and rank environment through the spawn start method, here on gloo."""
    assert launch(_sum_of_ranks, 2, start_method="spawn", timeout_s=120) == [(0, 2, 3.0, "0"), (1, 2, 3.0, "1")]


def test_a_raising_spawned_rank_is_named():
    with pytest.raises(WorkerError, match=r"rank 1 failed:(.|\n)*bad shard on purpose"):
        launch(_raise_on_rank_1, 2, start_method="spawn", timeout_s=120)


def test_an_unknown_start_method_is_refused():
    with pytest.raises(ValueError, match="start_method"):
        launch(_sum_of_ranks, 1, start_method="forkserver-please")


def test_a_training_rank_runs_spawned_as_on_a_gpu(tmp_path):
    """`ltmdsl train --nproc N --device cuda` spawns its ranks: the rank's arguments (IR, config, plan) pickle,
    and a spawned rank trains to the same losses as a forked one."""
    import ltmdsl
    from ltmdsl.distributed.plan import plan_from
    from ltmdsl.train import metrics, parallel
    from ltmdsl.train.loop import TrainConfig
    from tests.paths import EXAMPLES

    ir = ltmdsl.load(EXAMPLES / "ltm-tiny.ltm").ir.model()
    losses = {}
    for method in ("fork", "spawn"):
        config = TrainConfig(out=str(tmp_path / method), task="mqar", options={"context": 64}, steps=2, batch=2)
        status, _ = launch(parallel._rank_main, 1, (ir, config, plan_from(world=1), False, False),
                           start_method=method, timeout_s=180)[0]
        assert status == "ok"
        losses[method] = [r["loss"] for r in metrics.read(tmp_path / method / metrics.METRICS)]
    assert len(losses["spawn"]) == 2 and losses["spawn"] == losses["fork"]
