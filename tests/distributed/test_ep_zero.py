"""Expert parallelism with data parallelism and ZeRO 0-3 on tiny-hybrid, 4 forked gloo ranks: dp = 4 with
ep = 2 carved out of it (two ep groups of 2 ranks, each holding 2 of the MoE's 4 experts; ranks 0 and 2 hold
the same experts, as do 1 and 3: the expert data-parallel ranks); the same inside pipeline stages, and with
context parallelism (dp = cp = ep = 2: each cp rank's tokens dispatched within its ep group).

Oracle: the single-process run on the whole batch. The loss of the first 3 AdamW steps and the first step's
gradients (the experts' gathered from their ranks) equal it within 1e-5 relative in float64 (measured ~5e-15:
only the order of the sums differs).

Per-rank weight, gradient and optimizer bytes after a step (fp32, AdamW m and v: 8 bytes a parameter) equal the
memory model's per-GPU prediction for the plan, which shards expert state over dp/ep ranks and dense state over
dp (ltmdsl/memory/training.py): the dense parameters P_d and the rank's E/ep experts P_e/ep are
  zero 0  held whole
  zero 1  optimizer state P_d/dp + (P_e/ep)/(dp/ep) by the distributed optimizer twice (expert_optimizer.py)
  zero 2  gradients so by FSDP2 (the experts' own FSDP unit over the dp/ep ranks holding them); FSDP2 keeps
          weights sharded at rest too (test_memory.py: the memory model keeps the ZeRO paper's whole weights)
  zero 3  weights sharded too; the model's step adds FSDP2's root gathered whole (test_memory.py)
"""

from __future__ import annotations

import pytest
import torch
from dist_cases import assert_matches_reference, rank_run, reference_run, tiny_hybrid
from test_memory import _fsdp_root, _measure, _predicted

from ltmdsl.distributed import launch, plan_from

RTOL = 1e-5
ZEROS = {"zero0-allreduce": 0, "zero1-distributed-optimizer": 1, "zero2-fsdp": 2, "zero3-fsdp": 3}


@pytest.fixture(scope="module")
def hybrid():
    ir = tiny_hybrid()
    return ir, reference_run(ir, dtype=torch.float64)


PLANS = {**{f"dp4-ep2-{k}": {"ep": 2, "zero": z} for k, z in ZEROS.items()},
         "dp4-ep4-zero3": {"ep": 4, "zero": 3},  # ep = dp: each expert on one rank, FSDP2 over one rank's group
         "pp2-dp2-ep2-zero3": {"pp": 2, "ep": 2, "zero": 3, "microbatches": 2},
         "pp2-dp2-ep2-zero1": {"pp": 2, "ep": 2, "zero": 1, "microbatches": 2},
         # cp: each ep group the dp ranks of one cp coordinate, dispatching their sequence shards' tokens; the
         # experts' replicas are the edp x cp ranks (here the 2 cp ranks)
         "dp2-cp2-ep2-zero0": {"cp": 2, "ep": 2, "zero": 0},
         "dp2-cp2-ep2-zero3": {"cp": 2, "ep": 2, "zero": 3}}


@pytest.mark.parametrize("degrees", PLANS.values(), ids=PLANS.keys())
def test_ep_within_dp_matches_one_process(hybrid, degrees):
    ir, (ref_losses, ref_grads) = hybrid
    plan = plan_from(world=4, **degrees)
    results = launch(rank_run, 4, (ir, plan, 3, torch.float64), timeout_s=300)
    grads = {}  # rank 0's gradients; under pp each stage's first rank's
    for r in results[::4 // plan.pp]:
        grads |= r[1]
    assert_matches_reference(results, (ref_losses, ref_grads), RTOL, grads=grads)


MEMORY_PLANS = {**{f"dp4-ep2-{k}": {"ep": 2, "zero": z} for k, z in ZEROS.items()},
                "dp2-cp2-ep2-zero1": {"cp": 2, "ep": 2, "zero": 1}, "dp2-cp2-ep2-zero3": {"cp": 2, "ep": 2, "zero": 3}}


@pytest.mark.parametrize("degrees", MEMORY_PLANS.values(), ids=MEMORY_PLANS.keys())
def test_ep_within_dp_rank_bytes_equal_the_memory_model(degrees):
    ir = tiny_hybrid()
    plan = plan_from(world=4, **degrees)
    zero = plan.zero
    want = _predicted(ir, plan)
    dense = ir.params_total - sum(p for layer in ir.layers if layer.kind == "moe"
                                  for p in [layer.mixer.experts * layer.mixer.expert_params(ir.d_model)])
    experts = ir.params_total - dense  # every MoE layer's routed experts (tiny-hybrid's one MoE, used once)
    held = dense + experts // 2  # a rank's parameters: the dense ones and its 2 of 4 experts
    sharded = dense // 4 + experts // 2 // 2  # ... ZeRO-sharded: dense over dp*cp = 4, its experts over dp*cp/ep = 2
    assert want["optimizer"] == 8 * (held if zero == 0 else sharded)  # the memory model's arithmetic, stated
    assert want["gradients"] == 4 * (held if zero < 2 else sharded)
    if zero == 2:  # FSDP2 shards weights at rest where the model (the ZeRO paper) keeps them whole
        want = dict(want, weights=4 * sharded)
    if zero == 3:  # at rest the shards; the model's step adds the root FSDP2 gathers whole
        assert want["weights"] == 4 * sharded + 4 * _fsdp_root(ir)
        want = dict(want, weights=4 * sharded)
    measured = [got for got, _ in launch(_measure, 4, (ir, plan))]
    assert measured == [want] * 4, (measured, want)
