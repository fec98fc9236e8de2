"""Distributed checkpoints under expert parallelism: tiny-hybrid trained 2 steps under an ep x ZeRO plan (ep
carved out of dp, the experts' state sharded over the ranks holding them), saved with torch.distributed.checkpoint,
resumed under another plan (other ep, other ZeRO stage, other world size: DCP reshards the experts' DTensors);
the third and fourth steps' losses equal the uninterrupted single-process run's within 1e-5 relative in float64
(the fourth needs the loaded optimizer state; ZeRO 1's two halves, dense and expert, saved as one), and the exported single-file checkpoint holds exactly the weights saved."""

from __future__ import annotations

import pytest
from dist_cases import tiny_hybrid
from test_checkpoint import assert_resumes_and_exports64

#: (world, saved plan) -> (world, resumed plan)
PLANS = {"dp4-ep2-zero3-to-dp2-ep2-zero2": ((4, {"ep": 2, "zero": 3}), (2, {"ep": 2, "zero": 2})),
         "dp2-ep2-zero2-to-dp4-ep4-zero0": ((2, {"ep": 2, "zero": 2}), (4, {"ep": 4, "zero": 0})),
         "dp2-cp2-ep2-zero3-to-one-process": ((4, {"cp": 2, "ep": 2, "zero": 3}), (1, {})),
         "dp4-ep2-zero1-to-one-process": ((4, {"ep": 2, "zero": 1}), (1, {})),
         "dp2-ep2-zero3-to-dp4-ep2-zero1": ((2, {"ep": 2, "zero": 3}), (4, {"ep": 2, "zero": 1}))}


@pytest.mark.parametrize("saved, resumed", PLANS.values(), ids=PLANS.keys())
def test_ep_zero_checkpoint_resumes_under_another_plan(tmp_path, saved, resumed):
    assert_resumes_and_exports64(tmp_path, tiny_hybrid(), saved, resumed, timeout_s=300)
