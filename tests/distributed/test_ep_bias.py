"""Expert biases under expert parallelism (gpt-oss: gate, up [F] and down [d] biases on every expert) on a
tiny gpt-oss-shaped model (banded and global attention with q/k/v/o biases and sinks, 4 experts of a clamped
SwiGLU with biases, top 2 of the router's biased logits): each ep rank holds its experts' biases beside their
weights (split on the expert axis), under expert-tp = tp the gate and up biases split by F with their weights
and the down bias by d (each tp rank adds its slice into its partial output, so the sum over tp adds it once).
ZeRO, the experts' half of the distributed optimizer and DCP treat them as expert parameters.

Oracle: the single-process run on the whole batch. Losses of the first 3 AdamW steps and the first step's
gradients (gathered over ep and tp) within 1e-5 relative in float64; the biases start at zero, so the first
gradient checks their gradient and the second and third losses their values. Per-rank weight, gradient and
optimizer bytes (fp32, AdamW) equal the memory model's per-GPU prediction (expert parameters, biases included,
/ (t*ep); their ZeRO state / (dp*c/ep)). A checkpoint saved under ep (and tp x ep x ZeRO 1) resumes under one
process and under ep alone with the uninterrupted run's third and fourth losses, and exports exactly.
"""

from __future__ import annotations

import pytest
import torch
from dist_cases import assert_matches_reference, rank_run, reference_run
from test_checkpoint import assert_resumes_and_exports64
from test_memory import _measure, _predicted

import ltmdsl
from ltmdsl.distributed import launch, plan_from

RTOL = 1e-5

GPT_OSS_TINY = """
model gpt_oss_tiny {
    vocab = 64
    d_model = 32
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer attn = attention(heads = 4, kv_heads = 2, head_dim = 8, rope_theta = 10000, qkv_bias = true,
                           out_bias = true, sinks = true)
    layer moe = moe(experts = 4, top_k = 2, d_ff = 16, act = swiglu_clamped, routing = topk_softmax,
                    swiglu_limit = 7, swiglu_alpha = 1.702, router_bias = true, expert_bias = true)
    stack { attn(window = 8) moe attn moe }
}
"""


def gpt_oss_tiny():
    return ltmdsl.loads(GPT_OSS_TINY).ir.model()


@pytest.fixture(scope="module")
def reference():
    ir = gpt_oss_tiny()
    return ir, reference_run(ir, dtype=torch.float64)


#: (world, plan degrees)
PLANS = {
    "ep2": (2, {"ep": 2}),
    "dp4-ep2-zero1": (4, {"ep": 2, "zero": 1}),
    "dp4-ep2-zero3": (4, {"ep": 2, "zero": 3}),
    "tp2-dp2-ep2": (4, {"tp": 2, "ep": 2}),
    "tp2-dp2-ep2-zero3": (4, {"tp": 2, "ep": 2, "zero": 3}),
    "tp2": (2, {"tp": 2}),
    "tp2-ep2-etp1": (2, {"tp": 2, "ep": 2, "etp": 1}),  # folded: biases whole with their experts
    "tp2-dp2-ep4-etp1-zero1": (4, {"tp": 2, "ep": 4, "etp": 1, "zero": 1}),
}


@pytest.mark.parametrize("world, degrees", PLANS.values(), ids=PLANS.keys())
def test_expert_biases_split_match_one_process(reference, world, degrees):
    ir, (ref_losses, ref_grads) = reference
    results = launch(rank_run, world, (ir, plan_from(world=world, **degrees), 3, torch.float64), timeout_s=300)
    assert_matches_reference(results, (ref_losses, ref_grads), RTOL)
    assert any(name.endswith("experts.down_bias") for name in results[0][1])


MEMORY_PLANS = {"dp2-ep2-zero0": (2, {"ep": 2, "zero": 0}), "dp4-ep2-zero1": (4, {"ep": 2, "zero": 1}),
                "tp2-dp2-ep2-zero0": (4, {"tp": 2, "ep": 2, "zero": 0}),
                "tp2-ep2-etp1-zero0": (2, {"tp": 2, "ep": 2, "etp": 1, "zero": 0})}


@pytest.mark.parametrize("world, degrees", MEMORY_PLANS.values(), ids=MEMORY_PLANS.keys())
def test_expert_bias_rank_bytes_equal_the_memory_model(world, degrees):
    """ZeRO 0 and 1 hold weights whole (the memory model's convention and FSDP-free here), so every
    component is compared as predicted; the expert biases are part of the expert parameters / (t*ep)."""
    ir = gpt_oss_tiny()
    plan = plan_from(world=world, **degrees)
    want = _predicted(ir, plan)
    measured = [got for got, _ in launch(_measure, world, (ir, plan))]
    assert measured == [want] * world, (measured, want)


CHECKPOINTS = {"ep2-to-one-process": ((2, {"ep": 2}), (1, {})),
               "tp2-dp2-ep2-zero1-to-ep2": ((4, {"tp": 2, "ep": 2, "zero": 1}), (2, {"ep": 2}))}


@pytest.mark.parametrize("saved, resumed", CHECKPOINTS.values(), ids=CHECKPOINTS.keys())
def test_expert_bias_checkpoint_resumes_under_another_plan(tmp_path, saved, resumed):
    assert_resumes_and_exports64(tmp_path, gpt_oss_tiny(), saved, resumed, timeout_s=300)
