"""One rank of MoE parallel folding traced at every etp (ltmdsl.measure under a fake process group) against the
memory model: each tp rank dispatches its 1/t part of the tokens over ep, the received rows all-gathered over
the etp group, each rank's F/etp slice of its E/ep experts, the partial outputs reduce-scattered back (the
runtime's `ep_routed`; traced with balanced routing, static shapes).

Targets (issue 14): weights, gradients, optimizer states and logits exactly equal; activations within 5%;
the traced peak within 10% of the predicted per-GPU total. Measured (d_model 64, 4 experts, top 2, T 256, b 2;
recompute none / full): activations +0.46% / +0.38% (tp 2 x ep 2 x etp 1), +2.08% / +1.68% (tp 4 x ep 2 x etp 2
and tp 4 x ep 1 x etp 2: the router's int64 indices and fp32 weights on every tp rank, which the model's
8*tok*E does not count), +0.27% / +0.24% (tp 1 x dp 4 x ep 2 x etp 2 and tp 1 x ep 1 x etp 2). With the
dispatch counted as n = tokens*etp/t for everything (the earlier model) against the gathering trace, recompute
none: -3.4% (tp 4 x ep 2 x etp 2), -9.5% (tp 1 x dp 4 x ep 2 x etp 2), +2.9% (tp 4 x ep 1 x etp 2).
"""

from __future__ import annotations

import pytest

import ltmdsl
from ltmdsl.distributed.plan import plan_from
from ltmdsl.measure import measure
from ltmdsl.measure.ranks import needs_group

ACTIVATIONS_TOL = 0.05  # issue 14's target for training activations
PEAK_TOL = 0.10  # issue 14's target for the traced peak against the predicted per-GPU total

MOE = """
model sparse {
    vocab = 256
    d_model = 64
    dtype = bf16
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer attn = attention(heads = 4, kv_heads = 2, rope_theta = 10000)
    layer ffn = moe(experts = 4, top_k = 2, d_ff = 64)
    stack { repeat 2 { attn ffn } }
}
budget train for sparse {
    training context = 256, batch = 2
    on 1 x H100
}
"""

FOLDED = {
    "tp2-ep2-etp1": dict(tp=2, ep=2, etp=1, gpus=2),
    "tp4-ep2-etp2": dict(tp=4, ep=2, etp=2, gpus=4),
    "tp1-dp4-ep2-etp2": dict(ep=2, etp=2, gpus=4),  # etp > tp: the etp group spans dp ranks
    "tp4-ep1-etp2": dict(tp=4, ep=1, etp=2, gpus=4),  # etp < tp without ep
    "tp1-dp2-ep1-etp2": dict(ep=1, etp=2, gpus=2),  # folded with no tp, cp nor ep: a group all the same
}
CASES = {f"{plan}-{recompute}": (plan, recompute) for plan in FOLDED for recompute in ("none", "full")}


@pytest.fixture(scope="module")
def spec():
    return ltmdsl.loads(MOE)


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_folded_rank_traces_states_exactly_and_activations_within_5_percent(spec, case):
    plan, recompute = CASES[case]
    m = measure(spec.model, spec.budgets[0], recompute=recompute, **FOLDED[plan])
    for component in ("weights", "gradients", "optimizer", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()
    assert any("fake process group" in n for n in m.notes)
    assert any("balanced routing" in n for n in m.notes)


def test_a_folded_plan_without_tp_cp_or_ep_is_traced_as_one_rank_of_its_group():
    """tp 1 x ep 1 x etp 2 splits each expert's width over 2 ranks that exchange its rows: distributed (was
    traced as one process, whole experts, -16.6% activations)."""
    assert needs_group(plan_from(world=2, etp=2))
    assert not needs_group(plan_from(world=2))


WIDE = MOE.replace("d_model = 64", "d_model = 1024").replace("d_ff = 64", "d_ff = 1024") + """
budget serve for sparse {
    inference context = 512, batch = 2
    on 1 x H100
}
"""


@pytest.mark.parametrize("plan", FOLDED, ids=FOLDED)
def test_folded_rank_serving_at_width_1024_holds_what_the_workspace_counts(plan):
    """A prefill of 512 tokens at d_model 1024 (the experts' rows dominate): weights, cache and logits exact,
    activations within 5% and the peak within 10%. Measured +0.03% to +0.31%; at tp 1 x ep 1 x etp 2 +75.3%
    before the workspace counted the experts apart at ep = 1 (they were counted as one process's loop) and
    +7.9% before it counted the gather's padded rows (runtime `_all_gather_rows`)."""
    spec = ltmdsl.loads(WIDE)
    m = measure(spec.model, spec.budgets[1], **FOLDED[plan])
    for component in ("weights", "kv_cache", "logits"):
        assert m.measured[component] == m.predicted[component], component
    assert abs(m.relative["activations"]) <= ACTIVATIONS_TOL, m.to_text()
    assert abs(m.peak_relative) <= PEAK_TOL, m.to_text()
