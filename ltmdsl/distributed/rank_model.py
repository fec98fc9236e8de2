"""One rank's share of a model under a plan: check, mesh, meta build, tp split, FSDP, materialise.

    ranked = parallelize(ir, plan, seed=0)        # inside a worker (launch / torchrun), group initialised
    ranked.model, ranked.optimizer(lr=1e-3), ranked.mesh

The (pp, dp, cp, tp) mesh: pp cuts the stack into stages (pipeline.py), tp splits each mixer, ep and etp split the experts over ep of the dp ranks or, folded, over the stage's ranks (expert_parallel.py), cp splits the sequence (context_parallel.py), and ZeRO
shards over the dp x cp ranks that hold the same weights. Order matters: the model is built on the meta device, split by tensor parallelism, wrapped by FSDP2 (ZeRO
2/3; under pp this rank's stage only, once it is cut), and only then materialised, so each rank allocates
exactly its shards (materialize.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltmdsl.distributed.data_parallel import FSDP_STAGES, apply_fsdp, make_optimizer
from ltmdsl.distributed.expert_parallel import apply_expert_parallel, expert_shard, runs_experts_apart
from ltmdsl.distributed.materialize import build_meta, materialize
from ltmdsl.distributed.context_parallel import apply_context_parallel, cp_forwards
from ltmdsl.distributed.mesh import device_mesh, device_type, replica_mesh
from ltmdsl.distributed.pipeline import build_stage, check_pipeline
from ltmdsl.distributed.plan import check_plan
from ltmdsl.distributed.tensor_parallel import apply_tensor_parallel, keep_gradient_placements, tp_plans
from ltmdsl.ir import ModelIR, ParallelPlan


@dataclass(frozen=True)
class RankModel:
    """This rank's model shard, the plan it runs and the (dp, tp) device mesh."""

    model: torch.nn.Module
    plan: ParallelPlan
    mesh: object  # torch DeviceMesh ("dp", "cp", "tp")
    dp_sharded: frozenset[int] = frozenset()  # ids of parameters split over dp (experts under ep)
    schedule: object = None  # the 1F1B schedule when pp > 1 (then `model` is this rank's pipeline Stage)

    @property
    def pp_mesh(self):
        """The pipeline stages' ranks."""
        return self.mesh["pp"]

    @property
    def dp_mesh(self):
        """The data-parallel ranks: each takes B/dp sequences."""
        return self.mesh["dp"]

    @property
    def cp_mesh(self):
        """The context-parallel ranks: each takes T/cp tokens of its sequences."""
        return self.mesh["cp"]

    @property
    def replica_mesh(self):
        """The ranks with the same weights (dp x cp): gradients averaged, ZeRO state sharded over them."""
        return replica_mesh(self.mesh, self.plan)

    @property
    def tp_mesh(self):
        return self.mesh["tp"]

    @property
    def expert_replicas(self):
        """The ranks holding this rank's experts (edp x cp) under expert parallelism, else None."""
        ep = expert_shard(self.model)
        return None if ep is None else ep.replicas

    def optimizer(self, lr: float, **adamw) -> torch.optim.Optimizer:
        """AdamW on this rank's parameters, sharded over dp (the experts' over their replicas) as the plan's
        ZeRO stage says."""
        return make_optimizer(self.model, self.plan.zero, self.replica_mesh, lr, **adamw)


def split(model, plan: ParallelPlan, mesh, *, fsdp_stages: tuple[int, ...] = FSDP_STAGES) -> set[int]:
    """Split a meta LTModel into this rank's share, in parallelize's order: tensor parallelism, context
    parallelism, expert parallelism, then FSDP2 when the plan's ZeRO stage is in `fsdp_stages` (the memory
    trace keeps ZeRO 1/2 to itself, as Megatron's flat buffers). Returns the ids of the parameters split over dp
    (experts under ep)."""
    if plan.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=plan.sequence_parallel,
                              folded_pieces=plan.cp > 1 and plan.cp_split == "balanced", expert_tp=plan.expert_tp)
    if plan.cp > 1:
        apply_context_parallel(model, mesh["cp"], plan.cp_split)
    dp_sharded: set[int] = set()
    if runs_experts_apart(plan):
        dp_sharded = apply_expert_parallel(model, mesh, plan)
    if plan.zero in fsdp_stages and plan.pp == 1:
        apply_fsdp(model, replica_mesh(mesh, plan), plan.zero)
    return dp_sharded


def parallelize(ir: ModelIR, plan: ParallelPlan, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                device: str | torch.device | None = None) -> RankModel:
    """This rank's model for `plan` (the process group must be up: launch() or init_from_env())."""
    import torch.distributed as dist

    check_plan(ir, plan, dist.get_world_size())
    if plan.tp > 1:
        tp_plans(ir, plan.tp, plan.expert_tp)  # refuse an unsplittable kind before building anything
    if plan.cp > 1:
        cp_forwards(ir)  # likewise a kind with no context-parallel form
    if plan.pp > 1:
        check_pipeline(ir, plan.pp, plan.interleave)
    kind = device_type()
    mesh = device_mesh(plan, kind)
    model = build_meta(ir, dtype)
    dp_sharded = split(model, plan, mesh)
    if device is None:
        device = torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    if plan.pp > 1:
        stage, make_schedule = build_stage(model, mesh["pp"], plan.microbatches, plan.interleave)
        if plan.zero in FSDP_STAGES:  # FSDP2 on this rank's stage(s) only: the other stages never exist here
            apply_fsdp(stage, replica_mesh(mesh, plan), plan.zero)
        stage.to_empty(device=device)  # only this stage's weights exist; the rest stay on meta
        model.init_weights(seed)  # the whole draw order, kept where allocated
        if plan.tp > 1 and plan.zero not in FSDP_STAGES:
            keep_gradient_placements(stage)  # the first stage's vocab-parallel embedding: its V/t rows' gradient
        return RankModel(stage, plan, mesh, frozenset(dp_sharded), make_schedule(device))
    materialize(model, device, seed)
    if plan.tp > 1 and plan.zero not in FSDP_STAGES:
        keep_gradient_placements(model)
    return RankModel(model, plan, mesh, frozenset(dp_sharded))
