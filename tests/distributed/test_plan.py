"""Plans from budgets and degrees, and every refusal before launch (pure: no worker, no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dist_cases import TP_SPEC, tiny_hybrid, tp_small

import ltmdsl
from ltmdsl.distributed.plan import PlanError, check_plan, plan_errors, plan_from
from ltmdsl.ir import ParallelPlan

BUDGET = TP_SPEC + """
budget train4 for tp_small {
    training context = 64, batch = 8
    on 4 x H100 with tp = 2, zero = 3
}
"""


def test_plan_from_budget_is_the_budgets_plan():
    spec = ltmdsl.loads(BUDGET)
    budget = spec.budget("train4")
    plan = plan_from(budget)
    assert plan == budget.parallel
    assert (plan.dp, plan.tp, plan.zero, plan.world) == (2, 2, 3, 4)
    check_plan(spec.model, plan, 4, batch=budget.batch, seq_len=budget.context)
    assert plan_from(budget, zero=2).zero == 2  # an override keeps the budget's degrees


def test_plan_from_degrees_derives_dp():
    assert plan_from(world=4, tp=2) == ParallelPlan(tp=2, dp=2)
    assert plan_from(world=2, zero=3) == ParallelPlan(dp=2, zero=3)
    with pytest.raises(PlanError, match="unknown plan field"):
        plan_from(world=2, tpp=2)


CASES = {
    "world-mismatch": (tp_small, ParallelPlan(tp=2, dp=1), 4, {}, "tp*pp*cp*dp = 2*1*1*1 = 2 must equal the world size 4"),
    "tp-heads": (tp_small, ParallelPlan(tp=3, dp=1), 3, {}, "tp = 3 does not divide the 4 heads of layer 'attn'"),
    "ep-no-moe": (tp_small, ParallelPlan(dp=2, ep=2), 2, {}, "ep > 1 but the model has no MoE layers"),
    "ep-experts": (tiny_hybrid, ParallelPlan(dp=3, ep=3), 3, {}, "ep = 3 does not divide 4 experts"),
    "ep-beyond-the-stage": (tiny_hybrid, ParallelPlan(dp=2, ep=4), 2, {},
                            "etp*ep = 1*4 = 4 does not divide the tp*cp*dp = 1*1*2 = 2 ranks of a pipeline stage"),
    "pp-layers": (tp_small, ParallelPlan(pp=8), 8, {}, "pp = 8 exceeds the 4 sub-layers"),
    "batch": (tp_small, ParallelPlan(dp=2), 2, {"batch": 3}, "dp = 2 does not divide the batch of 3 sequences"),
    "sequence": (tp_small, ParallelPlan(cp=4), 4, {"seq_len": 30}, "cp = 4 does not divide the sequence of 30"),
    "interleave-without-pp": (tiny_hybrid, ParallelPlan(dp=2, interleave=2), 2, {}, "needs a pipeline"),
    "microbatches": (tp_small, ParallelPlan(pp=2, microbatches=3), 2, {"batch": 4}, "3 micro-batches do not divide"),
    "zero-stage": (tp_small, ParallelPlan(dp=2, zero=4), 2, {}, "zero is a ZeRO stage 0 to 3, got 4"),
}


@pytest.mark.parametrize("model, plan, world, kw, message", CASES.values(), ids=CASES.keys())
def test_refused_with_a_reason(model, plan, world, kw, message):
    ir = model()
    assert any(message in e for e in plan_errors(ir, plan, world, **kw)), plan_errors(ir, plan, world, **kw)
    with pytest.raises(PlanError, match="cannot run model"):
        check_plan(ir, plan, world, **kw)


def test_tp_refusal_is_the_memory_models_message():
    """`ltmdsl check` on the same plan in a budget says the very same words."""
    bad = TP_SPEC + "budget b for tp_small {\n training context = 64, batch = 8\n on 3 x H100 with tp = 3\n}\n"
    with pytest.raises(ltmdsl.SpecError) as err:
        ltmdsl.loads(bad)
    ours = plan_errors(tp_small(), ParallelPlan(tp=3), 3)
    assert ours[0] in str(err.value)


MOE_SPEC = TP_SPEC.replace("    stack { attn ffn swa gelu }",
                            "    layer moe = moe(experts = 4, top_k = 2, d_ff = 32)\n"
                            "    stack { attn moe swa gelu moe }")

#: plans the memory model's rank rule (etp*ep divides tp*cp*dp) accepts and ltmdsl.distributed once refused; each
#: runs exactly in tests/distributed/test_ep_fold.py
FOLDED = {
    "etp-above-tp": "tp = 1, ep = 2, etp = 2",
    "etp-above-tp-cp": "tp = 2, cp = 2, ep = 1, etp = 4",
    "etp-below-tp-no-ep": "tp = 4, ep = 1, etp = 2",
    "etp-not-dividing-tp": "tp = 2, ep = 1, etp = 4",
    "whole-experts-no-ep": "tp = 2, ep = 1, etp = 1",
    "ep-not-within-dp": "tp = 2, cp = 2, ep = 2",
}


@pytest.mark.parametrize("degrees", FOLDED.values(), ids=FOLDED.keys())
def test_plans_the_memory_model_predicts_are_accepted(degrees):
    """The budget's plan (so what was planned is what runs): the memory model accepts it and so does
    check_plan, with the budget's batch and context."""
    spec = ltmdsl.loads(MOE_SPEC + f"budget b for tp_small {{\n training context = 64, batch = 8\n "
                                   f"on 4 x H100 with {degrees}\n}}\n")
    budget = spec.budget("b")
    check_plan(spec.model, plan_from(budget), 4, batch=budget.batch, seq_len=budget.context)


RANK_RULE = {
    "etp-tp-times-ep-above-the-stage": ("tp = 2, ep = 2", 2),
    "etp-times-ep-not-dividing-the-stage": ("tp = 2, ep = 2, etp = 2", 2),
    "ep-beyond-the-stage": ("tp = 2, ep = 4, etp = 1", 2),
}


@pytest.mark.parametrize("degrees, gpus", RANK_RULE.values(), ids=RANK_RULE.keys())
def test_rank_rule_refusal_is_the_memory_models_message(degrees, gpus):
    """A plan whose etp*ep does not divide the stage's tp*cp*dp ranks: `ltmdsl check` refuses the budget and
    check_plan refuses the plan in the very same words."""
    text = MOE_SPEC + (f"budget b for tp_small {{\n training context = 64, batch = 8\n on {gpus} x H100 with "
                       f"{degrees}\n}}\n")
    with pytest.raises(ltmdsl.SpecError) as err:
        ltmdsl.loads(text)
    plan = ParallelPlan(**{k.strip(): int(v) for k, v in (kv.split("=") for kv in degrees.split(","))})
    ours = [e for e in plan_errors(ltmdsl.loads(MOE_SPEC).model, plan, gpus) if "etp*ep" in e]
    assert len(ours) == 1 and ours[0] in str(err.value), (ours, str(err.value))
    with pytest.raises(PlanError, match=r"etp\*ep"):
        check_plan(ltmdsl.loads(MOE_SPEC).model, plan, gpus)


def test_plan_module_imports_no_torch():
    code = "import sys, ltmdsl.distributed, ltmdsl.distributed.plan; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


CP_BUDGET = TP_SPEC + """
budget long for tp_small {
    training context = 48, batch = 4
    on 2 x H100 with cp = 2, cp_split = contiguous
}
budget default for tp_small {
    training context = 48, batch = 4
    on 2 x H100 with cp = 2
}
"""


def test_cp_split_is_a_budget_setting():
    spec = ltmdsl.loads(CP_BUDGET)
    assert plan_from(spec.budget("long")).cp_split == "contiguous"
    assert plan_from(spec.budget("default")).cp_split == "balanced"


@pytest.mark.parametrize("flag, budget, want", [(None, "long", "contiguous"), ("balanced", "long", "balanced"),
                                                ("contiguous", "default", "contiguous")],
                         ids=["budget", "flag-overrides-budget", "flag-over-default"])
def test_cli_cp_split_flag_overrides_the_budget(flag, budget, want):
    import argparse

    from ltmdsl.commands.train import _DEGREES, plan_of

    spec = ltmdsl.loads(CP_BUDGET)
    args = argparse.Namespace(budget=budget, **{k: None for k in _DEGREES})
    args.cp_split = flag
    plan, source = plan_of(args, spec, spec.model, 2)
    assert (plan.cp_split, plan.cp, source) == (want, 2, f"budget '{budget}'")
