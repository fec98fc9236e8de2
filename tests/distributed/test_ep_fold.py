"""MoE parallel folding (Megatron-Core's, arXiv 2504.14960) at every etp and ep whose product divides a stage's
tp*cp*dp ranks, on forked gloo ranks: the stage's ranks in mesh order are cut into (edp, ep, etp), etp innermost;
each rank holds E/ep experts, F/etp of each one's width (whole at etp = 1). Every rank keeps its 1/tp part of its
tp group's tokens, dispatches it over its ep group, the received rows are all-gathered over the etp group, the
experts' partial outputs reduce-scattered back over it, and the parts all-gathered over the tp group. Covered:
etp < tp dividing it (with ep > 1 and ep = 1: the experts replicated over tp/etp groups), etp > tp (tp = 1 with
dp = 4; tp 2 x cp 2 with etp = 4), etp = tp with ep not dividing dp (ep over the cp ranks), whole experts
replicated over tp x dp (etp = 1, ep = 1). Attention and the MLPs are split over tp as without ep.

Oracle: the single-process run on the whole batch. Losses of the first 3 AdamW steps and the first step's
gradients (gathered over ep and etp) within 1e-5 relative in float64.

Per-rank weight, gradient and optimizer bytes (fp32, AdamW) equal the memory model's per-GPU prediction:
expert parameters / (etp*ep), ZeRO-sharded over edp = tp*cp*dp / (etp*ep) (ltmdsl/memory/training.py).
"""

from __future__ import annotations

import pytest
import torch
from dist_cases import assert_matches_reference, rank_run, reference_run, stage_grads
from helpers import assert_close
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
    "tp4-ep2-etp2-on-4": (4, {"tp": 4, "ep": 2, "etp": 2, "zero": 0}),
    "tp4-ep2-etp2-sp-zero1-on-4": (4, {"tp": 4, "ep": 2, "etp": 2, "zero": 1, "sequence_parallel": True}),
    "tp4-ep2-etp2-zero3-on-4": (4, {"tp": 4, "ep": 2, "etp": 2, "zero": 3}),
    "tp4-dp2-ep2-etp2-zero1-on-8": (8, {"tp": 4, "ep": 2, "etp": 2, "zero": 1}),
    # etp > tp: an etp group spans tp groups (dp, cp ranks)
    "tp1-dp4-ep2-etp2-on-4": (4, {"tp": 1, "ep": 2, "etp": 2, "zero": 0}),
    "tp1-dp4-ep2-etp2-zero3-on-4": (4, {"tp": 1, "ep": 2, "etp": 2, "zero": 3}),
    "tp2-cp2-ep1-etp4-on-4": (4, {"tp": 2, "cp": 2, "ep": 1, "etp": 4, "zero": 0}),
    "tp2-dp2-ep1-etp4-zero1-on-4": (4, {"tp": 2, "ep": 1, "etp": 4, "zero": 1}),
    # etp < tp with ep = 1: the experts replicated over the tp/etp = 2 etp groups of a tp group
    "tp4-ep1-etp2-zero1-on-4": (4, {"tp": 4, "ep": 1, "etp": 2, "zero": 1}),
    "tp4-ep1-etp2-sp-on-4": (4, {"tp": 4, "ep": 1, "etp": 2, "zero": 0, "sequence_parallel": True}),
    # whole experts on every rank (etp = ep = 1 < tp), and etp = tp with ep over the cp ranks (ep does not divide dp)
    "tp2-dp2-ep1-etp1-zero1-on-4": (4, {"tp": 2, "ep": 1, "etp": 1, "zero": 1}),
    "tp2-cp2-ep2-etp2-on-4": (4, {"tp": 2, "cp": 2, "ep": 2, "zero": 0}),
}


@pytest.mark.parametrize("world, degrees", PLANS.values(), ids=PLANS.keys())
def test_folded_experts_match_one_process(reference, world, degrees):
    ir, (ref_losses, ref_grads) = reference
    results = launch(rank_run, world, (ir, plan_from(world=world, **degrees), 3, torch.float64), timeout_s=300)
    assert_matches_reference(results, (ref_losses, ref_grads), RTOL, grads=stage_grads(results))


#: (experts' width, world, plan): widths the tp degree does not divide, which folded experts do not split over tp
UNEVEN_WIDTHS = {
    "d_ff31-tp2-ep2-etp1-on-2": (31, 2, {"tp": 2, "ep": 2, "etp": 1, "zero": 1}),
    "d_ff30-tp4-ep2-etp2-on-4": (30, 4, {"tp": 4, "ep": 2, "etp": 2, "zero": 0}),
}


@pytest.mark.parametrize("width, world, degrees", UNEVEN_WIDTHS.values(), ids=UNEVEN_WIDTHS.keys())
def test_folded_experts_need_only_etp_to_divide_their_width(width, world, degrees):
    """Folded experts are split over etp, not tp: tp need not divide their width (etp must), and the run
    matches one process. At etp = tp the same plan is refused with the memory model's words."""
    ir = moe_tp(width)
    plan = plan_from(world=world, **degrees)
    assert plan_errors(ir, plan, world) == []
    errors = plan_errors(ir, plan_from(world=world, **{**degrees, "etp": None}), world)
    assert any(f"does not divide the {width} expert width d_ff" in e for e in errors), errors
    results = launch(rank_run, world, (ir, plan, 3, torch.float64), timeout_s=300)
    assert_matches_reference(results, reference_run(ir, dtype=torch.float64), RTOL)


#: (world, plan degrees)
BYTES_PLANS = {
    "tp2-dp2-ep2-zero0": (4, {"tp": 2, "ep": 2, "etp": 1, "zero": 0}),
    "tp2-dp2-ep2-zero1": (4, {"tp": 2, "ep": 2, "etp": 1, "zero": 1}),
    "tp2-dp2-ep4-zero1": (4, {"tp": 2, "ep": 4, "etp": 1, "zero": 1}),
    "tp2-cp2-ep2-zero1": (4, {"tp": 2, "cp": 2, "ep": 2, "etp": 1, "zero": 1}),
    "tp4-ep2-etp2-zero0": (4, {"tp": 4, "ep": 2, "etp": 2, "zero": 0}),
    "tp4-ep2-etp2-zero1": (4, {"tp": 4, "ep": 2, "etp": 2, "zero": 1}),
    "tp4-dp2-ep2-etp2-zero1-on-8": (8, {"tp": 4, "ep": 2, "etp": 2, "zero": 1}),
    "tp1-dp4-ep2-etp2-zero1": (4, {"tp": 1, "ep": 2, "etp": 2, "zero": 1}),
    "tp2-cp2-ep1-etp4-zero1": (4, {"tp": 2, "cp": 2, "ep": 1, "etp": 4, "zero": 1}),
    "tp2-dp2-ep1-etp4-zero1": (4, {"tp": 2, "ep": 1, "etp": 4, "zero": 1}),
    "tp4-ep1-etp2-zero1": (4, {"tp": 4, "ep": 1, "etp": 2, "zero": 1}),
    "tp2-dp2-ep1-etp1-zero1": (4, {"tp": 2, "ep": 1, "etp": 1, "zero": 1}),
    "tp2-cp2-ep2-etp2-zero1": (4, {"tp": 2, "cp": 2, "ep": 2, "etp": 2, "zero": 1}),
}


@pytest.mark.parametrize("world, degrees", BYTES_PLANS.values(), ids=BYTES_PLANS.keys())
def test_folded_rank_bytes_equal_the_memory_model(world, degrees):
    """Each rank holds E/ep experts F/etp wide, ZeRO 1 sharding their state over edp = tp*cp*dp / (etp*ep)
    (1, 2 or 4 ranks here: tp2-dp2-ep1-etp1's experts are whole on every rank, their state over 4): the
    measured bytes equal the memory model's per-GPU figures, which differ from the same plan's dense ones by
    the experts' share (experts / (etp*ep) a rank)."""
    ir = moe_tp()
    plan = plan_from(world=world, **degrees)
    want = _predicted(ir, plan)
    experts = sum(layer.mixer.experts * layer.mixer.expert_params(ir.d_model)
                  for layer in ir.layers if layer.kind == "moe")
    tp, etp, ep = degrees["tp"], degrees["etp"], degrees["ep"]
    dense = _predicted(ir, plan_from(world=world, tp=tp, cp=degrees.get("cp", 1), zero=degrees["zero"]))
    assert want["weights"] - dense["weights"] == 4 * (experts // (etp * ep) - experts // tp)  # fp32
    measured = [got for got, _ in launch(_measure, world, (ir, plan))]
    assert measured == [want] * world, (measured, want)


@pytest.mark.parametrize("degrees, message", [
    ({"tp": 2, "ep": 2, "etp": 1, "dp": 1, "pp": 2, "microbatches": 1},
     "2 does not divide the 23 tokens of a sequence on a rank"),
    ({"tp": 4, "ep": 2, "etp": 2}, "each of the tp = 4 ranks of a tensor-parallel group dispatches its 1/tp part"),
    ({"tp": 2, "ep": 1, "etp": 4}, "MoE parallel folding (etp = 4, ep = 1): each of the tp = 2 ranks"),
], ids=["uneven-tokens", "uneven-tokens-etp2", "uneven-tokens-etp-above-tp"])
def test_folded_plans_whose_tp_does_not_divide_a_ranks_tokens_are_refused(degrees, message):
    """Folded, each tp rank dispatches its 1/tp part of a rank's tokens: tp must divide a sequence's tokens on
    a rank (23 here), as sequence parallelism's tp must."""
    world = 4
    errors = plan_errors(moe_tp(), plan_from(world=world, **degrees), world, seq_len=23)
    assert any(message in e for e in errors), errors


#: (world, saved plan) -> (world, resumed plan)
CHECKPOINTS = {
    "tp2-dp2-ep4-etp1-zero1-to-tp2-dp2-ep2": ((4, {"tp": 2, "ep": 4, "etp": 1, "zero": 1}),
                                             (4, {"tp": 2, "ep": 2, "zero": 0})),
    "tp2-ep2-etp1-zero3-to-one-process": ((2, {"tp": 2, "ep": 2, "etp": 1, "zero": 3}), (1, {})),
    "tp4-ep2-etp2-zero1-to-one-process": ((4, {"tp": 4, "ep": 2, "etp": 2, "zero": 1}), (1, {})),
    "tp1-dp4-ep2-etp2-zero1-to-one-process": ((4, {"tp": 1, "ep": 2, "etp": 2, "zero": 1}), (1, {})),
    "tp4-ep1-etp2-zero1-to-tp2-dp2-ep2": ((4, {"tp": 4, "ep": 1, "etp": 2, "zero": 1}),
                                         (4, {"tp": 2, "ep": 2, "zero": 0})),
}


@pytest.mark.parametrize("saved, resumed", CHECKPOINTS.values(), ids=CHECKPOINTS.keys())
def test_folded_checkpoint_resumes_under_another_plan(tmp_path, saved, resumed):
    """Saved with the experts folded over the stage's ranks (whole, or split over etp groups below, above or
    across tp), resumed with them split like tp (DCP reshards the experts' DTensors) or in one process: the
    resumed losses equal the uninterrupted run's (test_checkpoint)."""
    assert_resumes_and_exports64(tmp_path, moe_tp(), saved, resumed, timeout_s=300)


DECODE_B, PROMPT, NEW = 3, 8, 3  # sequences (a decode step's 3 tokens: tp/etp = 2 does not divide them), tokens


@torch.no_grad()
def _decode(net, ids: torch.Tensor) -> torch.Tensor:
    """Prefill ids [B, T] through a fresh cache (B*T tokens: folded, each etp group dispatching its part),
    then NEW greedy decode steps of B tokens each -> the last logits of the prefill and of each step
    [NEW + 1, B, V]."""
    cache = net.new_cache(ids.shape[0], ids.shape[1] + NEW)
    out = [net(ids, cache)[:, -1]]  # [B, V]
    for _ in range(NEW):
        out.append(net(out[-1].argmax(-1)[:, None], cache, output="last")[:, -1])  # [B, V]
    return torch.stack(out)


def _prompt_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (DECODE_B, PROMPT), generator=torch.Generator().manual_seed(7))  # [B, T]


def _rank_decode(ir, plan) -> torch.Tensor:
    from ltmdsl.distributed import parallelize

    return _decode(parallelize(ir, plan, seed=0, dtype=torch.float64).model, _prompt_ids(ir.vocab))


DECODE_PLANS = {
    "tp2-ep2-etp1-on-2": (2, {"tp": 2, "ep": 2, "etp": 1}),
    "tp4-ep2-etp2-on-4": (4, {"tp": 4, "ep": 2, "etp": 2}),
}


@pytest.mark.parametrize("world, degrees", DECODE_PLANS.values(), ids=DECODE_PLANS.keys())
def test_folded_decode_of_tokens_tp_does_not_divide_matches_one_process(world, degrees):
    """Serving a folded model: a decode step's 3 tokens, which its tp/etp = 2 etp groups cannot split, are
    dispatched whole by every etp group (`ExpertShard.folds`); the prefill's 24 are split. The logits equal
    the single-process model's within 1e-6 relative (float64) on every rank."""
    from ltmdsl.runtime.build import build

    ir = moe_tp()
    want = _decode(build(ir, seed=0, dtype=torch.float64), _prompt_ids(ir.vocab))
    for got in launch(_rank_decode, world, (ir, plan_from(world=world, **degrees)), timeout_s=300):
        assert_close(got, want, 1e-6, "folded decode logits")
