"""Distributed checkpoints under context parallelism: a run trained 2 steps under cp 2 (tiny-hybrid's
distributed stack: global and windowed attention, Mamba-1, Mamba-2, MLP, MoE) or tp 2 x cp 2 (the laid-out
rows' model: Mamba-2, Gated DeltaNet, KDA, short conv and MQA, fused rows split by segments) with the
load-balanced split (each rank holding two chunks of the sequence, its optimizer state that of its replica of
the weights), saved with torch.distributed.checkpoint, resumes under one process, under dp 2 and under cp 2
(and the other way round): the third and fourth losses equal the uninterrupted single-process run's within
1e-5 relative in float64 (the fourth needs the loaded AdamW moments), and the export to the single-file
checkpoint holds exactly the weights saved."""

from __future__ import annotations

import pytest
from dist_cases import tiny_hybrid
from test_checkpoint import LAID_OUT, assert_resumes_and_exports64

import ltmdsl


def laid_out():
    """The laid-out rows' model without MQA's sinks (context parallelism runs plain softmax attention)."""
    text = LAID_OUT.replace(", sinks = true", "")
    assert text != LAID_OUT
    return ltmdsl.loads(text).ir.model()


#: model, (world, saved plan), (world, resumed plan)
PLANS = {
    "cp2-to-one-process": (tiny_hybrid, (2, {"cp": 2}), (1, {})),
    "cp2-to-dp2": (tiny_hybrid, (2, {"cp": 2}), (2, {"dp": 2})),
    "dp2-zero1-to-cp2-zero3": (tiny_hybrid, (2, {"zero": 1}), (2, {"cp": 2, "zero": 3})),
    "cp2-zero1-to-cp2-contiguous": (tiny_hybrid, (2, {"cp": 2, "zero": 1}), (2, {"cp": 2, "cp_split": "contiguous"})),
    "tp2-cp2-to-one-process": (laid_out, (4, {"tp": 2, "cp": 2}), (1, {})),
    "tp2-cp2-to-dp2": (laid_out, (4, {"tp": 2, "cp": 2}), (2, {"dp": 2})),
    "tp2-cp2-to-cp2": (laid_out, (4, {"tp": 2, "cp": 2}), (2, {"cp": 2})),
}


@pytest.mark.parametrize("model, saved, resumed", PLANS.values(), ids=PLANS.keys())
def test_cp_checkpoint_resumes_under_another_plan(tmp_path, model, saved, resumed):
    assert_resumes_and_exports64(tmp_path, model(), saved, resumed, timeout_s=300)
