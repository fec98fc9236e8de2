"""The parallel plan a distributed run executes, and its refusal before any worker starts.

A plan is the IR's own `ParallelPlan` (tp, pp, cp, dp, ep, zero, ...): taken from a budget
(`BudgetIR.parallel`, so what was planned is what runs) or from explicit degrees, with dp derived from the
world size when not given. `check_plan` refuses, with every problem in one message, a plan that

  - does not multiply to the world size (tp*pp*cp*dp),
  - does not divide the model (heads, experts, layers: the memory model's own words, budgets.plan_problems),
  - does not divide the batch over dp or the sequence over cp (2*cp chunks under the balanced cp split),
  - folds the experts (MoE parallel folding: etp other than tp, or ep not dividing dp) over tp ranks that
    do not divide a rank's tokens of a sequence (each tp rank dispatches its 1/tp part of them).
  - combines degrees ltmdsl.distributed does not run together yet (interleaving without a pipeline:
    docs/DISTRIBUTED.md).

Every etp and ep whose product divides a pipeline stage's tp*cp*dp ranks (the memory model's rank rule,
refused by it otherwise, in its own words: budgets.plan_problems) runs: ep carved out of the dp ranks at
etp = tp with ep dividing dp, else the experts folded over the stage's ranks cut into (edp, ep, etp)
(Megatron-Core's MoE parallel folding: expert_parallel.py).

Pure: importing this module imports no torch, so a launcher can refuse a plan without starting anything.
"""

from __future__ import annotations

import dataclasses

from ltmdsl.budgets import plan_problems
from ltmdsl.ir import CP_SPLITS, BudgetIR, ModelIR, ParallelPlan
from ltmdsl.kinds import kind_of


class PlanError(ValueError):
    """A parallel plan that cannot run this model on this many workers (the message lists every reason)."""


def plan_from(budget: BudgetIR | None = None, *, world: int | None = None, **degrees) -> ParallelPlan:
    """The plan of `budget` (its `parallel`), or ParallelPlan(**degrees) with dp = world / (tp*pp*cp)
    when dp is not given. Degrees given next to a budget override its plan (`zero=3`, ...)."""
    unknown = set(degrees) - {f.name for f in dataclasses.fields(ParallelPlan)}
    if unknown:
        raise PlanError(f"unknown plan field(s): {', '.join(sorted(unknown))}")
    base = budget.parallel if budget is not None else ParallelPlan()
    plan = dataclasses.replace(base, **degrees)
    rederive = budget is None or any(k in degrees for k in ("tp", "pp", "cp"))
    if "dp" not in degrees and world is not None and rederive:
        model_par = plan.tp * plan.pp * plan.cp
        if world % model_par == 0:  # otherwise check_plan reports the mismatch
            plan = dataclasses.replace(plan, dp=world // model_par)
    return plan


def plan_errors(model: ModelIR, plan: ParallelPlan, world: int, *, batch: int | None = None,
                seq_len: int | None = None) -> list[str]:
    """Every reason `plan` cannot run `model` on `world` workers (empty when it can)."""
    errors = []
    for name in ("tp", "pp", "cp", "dp", "ep", "microbatches", "interleave"):
        if getattr(plan, name) < 1:
            errors.append(f"{name} must be at least 1, got {getattr(plan, name)}")
    if plan.etp is not None and plan.etp < 1:
        errors.append(f"etp must be at least 1, got {plan.etp}")
    if errors:
        return errors
    if plan.zero not in (0, 1, 2, 3):
        errors.append(f"zero is a ZeRO stage 0 to 3, got {plan.zero}")
    if plan.world != world:
        errors.append(f"tp*pp*cp*dp = {plan.tp}*{plan.pp}*{plan.cp}*{plan.dp} = {plan.world} "
                      f"must equal the world size {world}")
    errors += [message for _key, message in plan_problems(model, plan)]
    if folds_experts(plan) and _has_experts(model) and plan.tp > 1 and seq_len is not None \
            and seq_len % plan.cp == 0 and (seq_len // plan.cp) % plan.tp:
        errors.append(f"MoE parallel folding (etp = {plan.expert_tp}, ep = {plan.ep}): each of the tp = {plan.tp} "
                      f"ranks of a tensor-parallel group dispatches its 1/tp part of the tokens, and {plan.tp} does "
                      f"not divide the {seq_len // plan.cp} tokens of a sequence on a rank (the sequence of "
                      f"{seq_len} / cp = {plan.cp})")
    if batch is not None and batch % plan.dp:
        errors.append(f"dp = {plan.dp} does not divide the batch of {batch} sequences")
    if seq_len is not None and seq_len % plan.cp:
        errors.append(f"cp = {plan.cp} does not divide the sequence of {seq_len} tokens")
    elif seq_len is not None and plan.cp > 1 and plan.cp_split == "balanced" and seq_len % (2 * plan.cp):
        errors.append(f"cp = {plan.cp} with the load-balanced split cuts the sequence into 2*cp = {2 * plan.cp} "
                      f"chunks, which do not divide the sequence of {seq_len} tokens (cp_split = contiguous "
                      "needs only cp to divide it)")
    if plan.sequence_parallel and plan.tp > 1 and seq_len is not None and seq_len % plan.cp == 0 \
            and (seq_len // plan.cp) % plan.tp:
        errors.append(f"sp = true splits each rank's {seq_len // plan.cp} tokens (the sequence of {seq_len} / cp = "
                      f"{plan.cp}) over tp = {plan.tp}, which does not divide them")
    if plan.cp_split not in CP_SPLITS:
        errors.append(f"cp_split is one of {', '.join(CP_SPLITS)}, got {plan.cp_split!r}")
    if plan.pp > 1 and batch is not None and (batch // max(plan.dp, 1)) % plan.microbatches:
        errors.append(f"{plan.microbatches} micro-batches do not divide the {batch // plan.dp} sequences of a "
                      "data-parallel rank")
    if plan.interleave > 1 and plan.pp == 1:
        errors.append(f"interleave = {plan.interleave} needs a pipeline (pp > 1)")
    return errors


def folds_experts(plan: ParallelPlan) -> bool:
    """Whether `plan` lays the experts out by MoE parallel folding (expert_parallel.py): an etp other than tp,
    or an ep that does not divide dp (the ep ranks then take tp or cp ranks too); otherwise, at etp = tp, the
    ep ranks are carved out of the dp ranks."""
    return plan.expert_tp != plan.tp or plan.dp % plan.ep != 0


def _has_experts(model: ModelIR) -> bool:
    """Whether any sub-layer has routed experts (its kind's Split names an expert-parallel count)."""
    return any(kind_of(layer.mixer).split(layer.mixer, model.d_model).ep for layer in model.layers)


def check_plan(model: ModelIR, plan: ParallelPlan, world: int, *, batch: int | None = None,
               seq_len: int | None = None) -> None:
    """Raise PlanError listing every problem of `plan_errors`; return None when the plan runs."""
    errors = plan_errors(model, plan, world, batch=batch, seq_len=seq_len)
    if errors:
        raise PlanError(f"plan {describe(plan)} cannot run model '{model.name}' on {world} workers:\n  "
                        + "\n  ".join(errors))


def describe(plan: ParallelPlan) -> str:
    """'dp=2 tp=1 ... zero=3': the degrees of a plan, for messages and benchmark rows (with etp when the experts
    fold otherwise than tp, sp under sequence parallelism and the cp split when cp > 1)."""
    text = " ".join(f"{k}={getattr(plan, k)}" for k in ("dp", "tp", "cp", "pp", "ep", "zero"))
    if plan.expert_tp != plan.tp:
        text += f" etp={plan.expert_tp}"
    if plan.sequence_parallel and plan.tp > 1:
        text += " sp"
    return f"{text} cp_split={plan.cp_split}" if plan.cp > 1 else text
