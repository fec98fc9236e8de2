"""MoE parallel folding (`etp`): the memory model splits the routed experts over etp x ep and ZeRO-shards
them over edp = tp*cp*dp / (etp*ep); a plan whose experts would need more ranks than the stage has is refused.

Oracles are hand counts of the tiny model below: 2 MoE layers of E = 4 SwiGLU experts, d = 64, F = 32, so the
routed experts hold 2 * 4 * 3 * 64 * 32 = 49,152 parameters; tp splits nothing else differently between two
plans that differ only in etp, so their per-GPU difference is the experts' alone. Exact (integers).
"""

from __future__ import annotations

import dataclasses

import pytest

import ltmdsl
from ltmdsl.errors import SpecError
from ltmdsl.memory import report
from ltmdsl.memory.settings import resolve
from paths import EXAMPLES

EXPERT_PARAMS = 2 * 4 * 3 * 64 * 32  # layers * E * (gate, up, down) * d * F

MODEL = """
model moe {
    vocab = 256
    d_model = 64
    dtype = bf16
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer attn = attention(heads = 4, kv_heads = 2, rope_theta = 10000)
    layer e = moe(experts = 4, top_k = 2, d_ff = 32)
    stack { repeat 2 { attn e } }
}
"""


def _budget(plan: str, mode: str = "training") -> tuple:
    spec = ltmdsl.loads(MODEL + f"budget b for moe {{\n {mode} context = 256, batch = 8\n on {plan}\n}}\n")
    return spec.model, spec.budgets[0]


def _states(plan: str, mode: str = "training") -> dict:
    m, b = _budget(plan, mode)
    return report(m, b).per_gpu_components


@pytest.mark.parametrize("zero", [0, 1, 2, 3], ids=lambda z: f"zero{z}")
def test_experts_split_over_etp_times_ep(zero):
    """tp = 2, ep = 2 on 2 GPUs: etp = 1 holds E/2 whole experts (1/2 of the experts' bytes), etp = tp = 2 would
    need 4 ranks; on 4 GPUs (dp = 2) etp = 2 holds 1/4. Weights: bf16 (2 bytes), gradients fp32 (4), AdamW 12;
    ZeRO shards the experts over edp = tp*dp / (etp*ep) (2 for etp = 1, 1 for etp = 2 on 4 GPUs)."""
    folded = _states(f"4 x H100 with tp = 2, ep = 2, etp = 1, zero = {zero}")
    default = _states(f"4 x H100 with tp = 2, ep = 2, zero = {zero}")
    edp = {"folded": 2, "default": 1}
    for comp, per_param, stage in (("weights", 2, 3), ("gradients", 4, 2), ("optimizer", 12, 1)):
        sharded = zero >= stage
        want_folded = EXPERT_PARAMS * per_param // 2 // (edp["folded"] if sharded else 1)
        want_default = EXPERT_PARAMS * per_param // 4 // (edp["default"] if sharded else 1)
        assert folded[comp] - default[comp] == want_folded - want_default, comp


@pytest.mark.parametrize("zero", [0, 1], ids=lambda z: f"zero{z}")
def test_etp_between_one_and_tp(zero):
    """tp = 4, ep = 2, etp = 2 on 8 GPUs (dp = 2): E/2 experts F/2 wide a GPU (1/4 of the experts' bytes),
    ZeRO over edp = 4*2 / (2*2) = 2; against etp = 1 (1/2 of them, ZeRO over edp = 4). The runtime holds the
    same (tests/distributed/test_ep_fold.py)."""
    between = _states(f"8 x H100 with tp = 4, ep = 2, etp = 2, zero = {zero}")
    folded = _states(f"8 x H100 with tp = 4, ep = 2, etp = 1, zero = {zero}")
    for comp, per_param, stage in (("weights", 2, 3), ("gradients", 4, 2), ("optimizer", 12, 1)):
        sharded = zero >= stage
        want_between = EXPERT_PARAMS * per_param // 4 // (2 if sharded else 1)
        want_folded = EXPERT_PARAMS * per_param // 2 // (4 if sharded else 1)
        assert folded[comp] - between[comp] == want_folded - want_between, comp


def test_zero_shards_of_the_experts_are_the_stage_whatever_etp():
    """Under ZeRO 1 a GPU's expert optimizer state is the experts' / (tp*cp*dp): etp x ep x edp is the stage."""
    folded = _states("4 x H100 with tp = 2, ep = 2, etp = 1, zero = 1")
    default = _states("4 x H100 with tp = 2, ep = 2, zero = 1")
    assert folded["optimizer"] == default["optimizer"]


def test_folding_over_cp_and_dp():
    """ep = 4 with tp = 1, cp = 2, dp = 2: the experts fold over the cp x dp ranks (edp = 1), a quarter each."""
    folded = _states("4 x H100 with cp = 2, ep = 4")
    dense = _states("4 x H100 with cp = 2")
    assert dense["weights"] - folded["weights"] == EXPERT_PARAMS * 2 * 3 // 4


def test_minimax_serve_1m_holds_an_eighth_of_the_experts():
    """examples/minimax-text-01.ltm serve_1m (tp = 8, ep = 8, etp = 1): each GPU holds 4 of 32 experts, the same
    bytes as tp = 8 alone splitting every expert's width 8 ways (it was divided by tp*ep = 64: 17.63 GiB of
    weights a GPU instead of 106.22 GiB)."""
    spec = ltmdsl.load(EXAMPLES / "minimax-text-01.ltm")
    b = spec.budgets[0]
    assert (b.parallel.tp, b.parallel.ep, b.parallel.expert_tp, b.parallel.edp) == (8, 8, 1, 1)
    folded = report(spec.model, b).per_gpu_components["weights"]
    plain = report(spec.model, dataclasses.replace(b, parallel=dataclasses.replace(b.parallel, ep=1, etp=None)))
    assert folded == plain.per_gpu_components["weights"]
    assert round(folded / 2**30, 2) == 106.22


def test_moe_activations_under_etp_one():
    """Training activations, tp = 2 x ep = 2 on 2 GPUs (sp, eager): both plans fold (dp = 1 does not take ep =
    2), so each tp rank dispatches half of its tokens, n = tok/2, whose rows sent back, weighted, and their ids
    are the same; at etp = tp = 2 the rows received are all-gathered over the etp group, so its experts see
    r = 2n rows a slot, at etp = 1 r = n: each expert's input and output 2*k*a*r*h and its int64 row ids 8*k*r
    halve; the router and the expert MLPs (F/etp wide on k*r rows) do not change. tok = 8 sequences / dp 1 * 256
    = 2048, two MoE layers: per layer (2*2*2*64 + 8*2) * 2048/2."""
    per_layer = (2 * 2 * 2 * 64 + 8 * 2) * 2048 // 2
    folded = _states("2 x H100 with tp = 2, ep = 2, etp = 1, sp = true")
    m, b = _budget("4 x H100 with tp = 2, ep = 2, sp = true")
    default = report(m, dataclasses.replace(b, gpus=2, parallel=dataclasses.replace(b.parallel, dp=1)))
    assert default.per_gpu_components["activations"] - folded["activations"] == 2 * per_layer


def test_an_override_plan_that_does_not_fold_is_refused():
    """A plan given as overrides (no budget check has seen it) is refused, not divided by ranks that do not
    exist: tp = 2, ep = 2 on 2 GPUs needs etp*ep = 4 ranks at etp = tp."""
    m, _ = _budget("2 x H100 with tp = 2")
    with pytest.raises(ValueError, match=r"etp\*ep = 2\*2 = 4 does not divide .* etp = 1 fits"):
        resolve(m, None, tp=2, ep=2, gpus=2)
    assert resolve(m, None, tp=2, ep=2, etp=1, gpus=2).etp == 1


@pytest.mark.parametrize("plan, message", [
    ("2 x H100 with tp = 2, ep = 2", "etp = tp = 2: etp*ep = 2*2 = 4 does not divide the tp*cp*dp = 2*1*1 = 2"),
    ("2 x H100 with tp = 2, ep = 4, etp = 1", "etp = 1: etp*ep = 1*4 = 4 does not divide the tp*cp*dp = 2*1*1 = 2"),
    ("2 x H100 with tp = 2, ep = 2, etp = 64", "etp = 64 does not divide the 32 expert width d_ff of layer 'e'"),
], ids=["etp-defaults-to-tp", "ep-beyond-the-stage-cannot", "etp-divides-the-width"])
def test_budget_plans_that_do_not_fold(plan, message):
    with pytest.raises(SpecError) as e:
        _budget(plan)
    assert message in str(e.value)
