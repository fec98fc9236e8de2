"""One rank of a parallel plan, built the way ltmdsl.distributed builds it, under a fake process group.

torch ships a `fake` backend (torch.testing._internal.distributed.fake_pg): a process group of any size
whose collectives return at once, without data or peers. Under it the plan's (pp, dp, cp, tp) device mesh
exists, and `ltmdsl.distributed.rank_model.split` turns the meta model into this rank's share exactly as a
training run does: DTensor tensor parallelism, each mixer's cp_forward (its all-gathers), experts sharded
over dp (ep), FSDP2 for ZeRO-3. The collectives' outputs have their real shapes, so every buffer they
allocate is traced; their contents are not computed (fake tensors have none anyway).

Under pp the mesh has its pipeline axis and the traced rank is one of the most loaded stage's ranks (ZeRO-3
shards that stage's modules: `stage.pipeline_root`).
DTensor works out each op's output shapes by running the op on fake tensors of the global shapes (its sharding
propagator), in the ambient FakeTensorMode when there is one. Under the trace that mode is ours, so MemTracker
counted those global-shape tensors as the rank's activations (the first sub-layer of each shape, before the
propagator's cache holds it: +68% on a tp = 2 prefill), though a real run allocates nothing for them (they are
fake there too). `fake_group` gives the propagator a mode of its own (`private_shape_propagation`).

The traced rank is the most loaded one: the memory model's most loaded pipeline stage, data-parallel rank 0,
the last context-parallel rank (every cp rank gathers the same keys and values; under the contiguous split the
last one's queries see them all), tensor-parallel rank 0 (tp ranks hold equal shares).

DTensor caches its sharding propagation by op schema (in Python and in its C++ dispatch fast path), and a schema's DeviceMesh compares equal to another
plan's mesh of the same shape and names: a trace after another tensor-parallel trace in the same process was
handed a mesh of the earlier (destroyed) group ("Could not resolve the process group"), and workers forked
from this process would inherit the fake group's meshes with the traced rank's coordinate. `fake_group` clears
those caches when it opens and closes a group (ltmdsl.distributed.launch.forget_dtensor_caches, which launched
workers also call), so each plan's DTensors carry its own mesh.
"""

from __future__ import annotations

import contextlib

from ltmdsl.distributed.plan import folds_experts
from ltmdsl.ir import ParallelPlan


def needs_group(plan: ParallelPlan) -> bool:
    """Whether tracing one rank of `plan` needs its process group: tp, cp, ep, the experts folded apart from the
    dense layers (MoE parallel folding: an etp other than tp, e.g. tp 1 x etp 2, whose etp ranks split each
    expert's width and exchange its rows) or ZeRO-3 (FSDP2). ZeRO 1/2 and pp are traced without one (flat
    sharded buffers; the stage's own layers)."""
    return plan.tp > 1 or plan.cp > 1 or plan.ep > 1 or folds_experts(plan) or plan.zero >= 3


def traced_rank(plan: ParallelPlan, stage: int) -> int:
    """The global rank traced (module docstring): mesh order (pp, dp, cp, tp), tp innermost."""
    pp_i, dp_i, cp_i, tp_i = stage, 0, plan.cp - 1, 0
    return ((pp_i * plan.dp + dp_i) * plan.cp + cp_i) * plan.tp + tp_i


@contextlib.contextmanager
def fake_group(plan: ParallelPlan, stage: int):
    """The plan's process group (fake backend) as the traced rank, and its device mesh; torn down on exit.
    Refuses to run inside an existing process group (a real run's would be replaced)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ltmdsl.distributed.launch import forget_dtensor_caches
    from ltmdsl.distributed.mesh import device_mesh

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; trace a parallel plan outside distributed runs")
    forget_dtensor_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=traced_rank(plan, stage), world_size=plan.world)
    try:
        with private_shape_propagation():
            yield device_mesh(plan, "cpu")
    finally:
        dist.destroy_process_group()
        forget_dtensor_caches()


@contextlib.contextmanager
def private_shape_propagation():
    """DTensor's sharding propagator runs its shape inference in a FakeTensorMode of its own, not in the
    trace's (module docstring), while the context is open. It looks the ambient mode up through the module
    global `detect_fake_mode` of torch.distributed.tensor._sharding_prop, which is what this replaces."""
    from torch.distributed.tensor import _sharding_prop

    saved = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args: None
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = saved

