"""Distributed training on torch.distributed: a budget's parallel plan run by N workers.

    from ltmdsl.distributed import launch, parallelize, plan_from, shard_batch, train_step

    def worker(ir, plan):                        # runs on every rank, process group already up
        ranked = parallelize(ir, plan, seed=0)    # meta build, tp split, FSDP, shard-by-shard init
        opt = ranked.optimizer(lr=1e-3)
        ids = shard_batch(all_ids, ranked)
        return train_step(ranked, opt, ids, shard_batch(all_targets, ranked))

    plan = plan_from(budget)                      # or plan_from(world=2, dp=2, zero=3)
    check_plan(ir, plan, world=2)                 # refused before any worker starts
    losses = launch(worker, nproc=2, args=(ir, plan))

Modules, one concept each:
    plan             the plan (the IR's ParallelPlan) from a budget or degrees; refusal with reasons (no torch)
    launch           N forked workers over a FileStore, or the group of a torchrun-started process
    mesh             the (dp, tp) device mesh
    materialize      meta-device build, shard-by-shard seeded init
    tensor_parallel  DTensor parallelize_module with each kind's tp_plan
    sequence_parallel under tp, the norms and residual stream on T/t tokens a rank; the mixers gather them
    context_parallel the sequence split over cp ranks; collectives for each kind's cp_forward
    cp_inference     serving over cp ranks: 1/cp of each attention cache a rank, prefill and decode merged by
                     log-sum-exp, recurrent states passed rank to rank
    expert_parallel  experts split over ep of the dp ranks (and over tp by width), all-to-all token exchange
    expert_optimizer ZeRO 1 under ep: dense and expert optimizer state sharded over their own replicas
    pipeline         stages at the memory model's cuts, torch.distributed.pipelining 1F1B (interleaved)
    data_parallel    ZeRO 0-3: gradient all-reduce, the distributed optimizer (ZeRO 1), FSDP2 fully_shard
    distributed_optimizer  ZeRO 1 as Megatron-LM's distributed optimizer: state sharded over a flat index
    rank_model       one rank's model under a plan (the above, in order)
    step             train_step, shard_batch and full tensors gathered from shards
    checkpoint       DCP save / load under any plan (resharding), export to the single-file checkpoint
    memory           per-rank parameter / gradient / optimizer bytes, to compare with the memory model

Runs today: dp with zero 0-3, tp (with or without sp), dp x tp (zero 0, 1, 3), cp (every kind; load-balanced
split by default), dp x cp, tp x cp, ep carved out of dp (ep dividing dp) with zero 0-3, tp (expert-tp = tp)
and cp, pp (1F1B, interleaved) with dp, tp (with or without sp), cp, ep and zero 0-3; in inference tp, cp and
tp x cp. Other combinations are refused with a message (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

from ltmdsl.distributed.launch import WorkerError, init_from_env, launch
from ltmdsl.distributed.plan import PlanError, check_plan, plan_errors, plan_from

__all__ = ["PlanError", "WorkerError", "check_plan", "init_from_env", "launch", "parallelize", "plan_errors",
           "plan_from", "shard_batch", "train_step"]


def __getattr__(name: str):
    """The torch-side entry points, imported on first use so `plan` checks never import torch."""
    if name == "parallelize":
        from ltmdsl.distributed.rank_model import parallelize

        return parallelize
    if name in ("shard_batch", "train_step"):
        from ltmdsl.distributed import step

        return getattr(step, name)
    raise AttributeError(f"module 'ltmdsl.distributed' has no attribute {name!r}")
