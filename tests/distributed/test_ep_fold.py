"""MoE parallel folding (etp = 1 under tp, Megatron-Core's): the experts fold over the tp (and dp, cp) ranks on
forked gloo ranks, within each pipeline stage. The stage's ranks in mesh order are cut into (edp, ep), ep innermost; each rank holds E/ep whole
experts; each tp rank routes its replica's tokens and dispatches its 1/t part of them; the experts' outputs are
all-gathered over tp. Attention and the MLPs are split over tp as without ep.

Oracle: the single-process run on the whole batch. Losses of the first 3 AdamW steps and the first step's
gradients (gathered over ep and tp) within 1e-5 relative in float64.

Per-rank weight, gradient and optimizer bytes (fp32, AdamW) equal the memory model's per-GPU prediction at
etp = 1: expert parameters / ep, ZeRO-sharded over edp = tp*dp / ep (ltmdsl/memory/training.py).
"""

from __future__ import annotations

import pytest
import torch
from dist_cases import assert_matches_reference, rank_run, reference_run, stage_grads
from test_checkpoint import assert_resumes_and_exports64
from test_ep_tp import moe_tp
from test_memory import _measure, _predicted

from ltmdsl.distributed import launch, plan_from
from ltmdsl.distributed.plan import plan_errors

RTOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    ir = moe_tp()
    return ir, reference_run(ir, dtype=torch.float64)


PLANS = {
    "tp2-ep2-etp1-on-2": (2, {"tp": 2, "ep": 2, "etp": 1, "zero": 0}),
    "tp2-ep2-etp1-sp-zero1-on-2": (2, {"tp": 2, "ep": 2, "etp": 1, "zero": 1, "sequence_parallel": True}),
    "tp2-dp2-ep4-etp1-on-4": (4, {"tp": 2, "ep": 4, "etp": 1, "zero": 0}),
    "tp2-dp2-ep2-etp1-zero3-on-4": (4, {"tp": 2, "ep": 2, "etp": 1, "zero": 3}),
    "tp2-cp2-ep4-etp1-on-4": (4, {"tp": 2, "cp": 2, "ep": 4, "etp": 1, "zero": 0}),
    "tp2-cp2-ep2-etp1-zero1-on-4": (4, {"tp": 2, "cp": 2, "ep": 2, "etp": 1, "zero": 1}),
    "tp2-pp2-ep2-etp1-m2-on-4": (4, {"tp": 2, "pp": 2, "ep": 2, "etp": 1, "microbatches": 2}),
}


@pytest.mark.parametrize("world, degrees", PLANS.values(), ids=PLANS.keys())
def test_folded_experts_match_one_process(reference, world, degrees):
    ir, (ref_losses, ref_grads) = reference
    results = launch(rank_run, world, (ir, plan_from(world=world, **degrees), 3, torch.float64), timeout_s=300)
    assert_matches_reference(results, (ref_losses, ref_grads), RTOL, grads=stage_grads(results))


BYTES_PLANS = {
    "tp2-dp2-ep2-zero0": {"tp": 2, "ep": 2, "zero": 0},
    "tp2-dp2-ep2-zero1": {"tp": 2, "ep": 2, "zero": 1},
    "tp2-dp2-ep4-zero1": {"tp": 2, "ep": 4, "zero": 1},
    "tp2-cp2-ep2-zero1": {"tp": 2, "cp": 2, "ep": 2, "zero": 1},
}


@pytest.mark.parametrize("degrees", BYTES_PLANS.values(), ids=BYTES_PLANS.keys())
def test_folded_rank_bytes_equal_the_memory_model(degrees):
    """At etp = 1 on 4 ranks each rank holds E/ep experts whole, ZeRO 1 sharding their state over edp =
    tp*cp*dp / ep (2, 1 and 2 here): the measured bytes equal the memory model's per-GPU figures."""
    ir = moe_tp()
    plan = plan_from(world=4, etp=1, **degrees)
    want = _predicted(ir, plan)
    experts = sum(layer.mixer.experts * layer.mixer.expert_params(ir.d_model)
                  for layer in ir.layers if layer.kind == "moe")
    dense = _predicted(ir, plan_from(world=4, tp=2, cp=degrees.get("cp", 1), zero=degrees["zero"]))
    assert want["weights"] - dense["weights"] == 4 * (experts // degrees["ep"] - experts // 2)  # fp32
    measured = [got for got, _ in launch(_measure, 4, (ir, plan))]
    assert measured == [want] * 4, (measured, want)


@pytest.mark.parametrize("degrees, message", [
    ({"tp": 2, "ep": 1, "etp": 1}, "etp = 1 with tp = 2 and ep = 1"),
    ({"tp": 2, "ep": 2, "etp": 1, "dp": 1, "pp": 2, "microbatches": 1}, "tp = 2 does not divide the 23 tokens of a sequence on a rank"),
    ({"tp": 4, "ep": 2, "etp": 2}, "etp = 2 with tp = 4"),
], ids=["no-ep", "uneven-tokens", "etp-between"])
def test_plans_the_runtime_does_not_fold_are_refused(degrees, message):
    world = 4
    errors = plan_errors(moe_tp(), plan_from(world=world, **degrees), world, seq_len=23)
    assert any(message in e for e in errors), errors


#: (world, saved plan) -> (world, resumed plan)
CHECKPOINTS = {
    "tp2-dp2-ep4-etp1-zero1-to-tp2-dp2-ep2": ((4, {"tp": 2, "ep": 4, "etp": 1, "zero": 1}),
                                             (4, {"tp": 2, "ep": 2, "zero": 0})),
    "tp2-ep2-etp1-zero3-to-one-process": ((2, {"tp": 2, "ep": 2, "etp": 1, "zero": 3}), (1, {})),
}


@pytest.mark.parametrize("saved, resumed", CHECKPOINTS.values(), ids=CHECKPOINTS.keys())
def test_folded_checkpoint_resumes_under_another_plan(tmp_path, saved, resumed):
    """Saved with whole experts folded over the tp ranks, resumed with them split like tp (DCP reshards the
    experts' DTensors) or in one process: the resumed losses equal the uninterrupted run's (test_checkpoint)."""
    assert_resumes_and_exports64(tmp_path, moe_tp(), saved, resumed, timeout_s=300)
