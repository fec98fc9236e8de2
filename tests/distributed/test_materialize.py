"""Meta-device build and shard-by-shard init: no storage before materialise, then exactly the weights of
the single-process build (same seed), whole in one process and as FSDP / tensor-parallel shards on 2 ranks,
each rank allocating only its shards."""

from __future__ import annotations

import pytest
import torch
from dist_cases import tiny_hybrid, tp_small

from ltmdsl.distributed import launch, parallelize, plan_from
from ltmdsl.distributed.materialize import build_meta, materialize
from ltmdsl.distributed.step import full_parameters
from ltmdsl.runtime.build import build


def test_meta_build_holds_no_weights_and_materialises_to_the_seeded_model():
    ir = tiny_hybrid()
    model = build_meta(ir, torch.float32)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, "cpu", seed=3)
    want = dict(build(ir, seed=3).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, want[name]), name


def _shards(ir, plan):
    ranked = parallelize(ir, plan, seed=3)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in ranked.model.parameters())
    return local, full_parameters(ranked.model)


CASES = {"hybrid-zero3": (tiny_hybrid, {"zero": 3}), "small-tp2": (tp_small, {"tp": 2})}


@pytest.mark.parametrize("model, degrees", CASES.values(), ids=CASES.keys())
def test_shards_equal_the_single_process_weights(model, degrees):
    ir = model()
    want = dict(build(ir, seed=3).named_parameters())
    results = launch(_shards, 2, (ir, plan_from(world=2, **degrees)))
    total = sum(p.numel() for p in want.values())
    for local, full in results:
        assert local < total, "a rank holds the whole model"
        assert set(full) == set(want)
        for name, p in full.items():
            assert torch.equal(p, want[name].detach()), name
    if "zero" in degrees:
        assert sum(local for local, _ in results) == total  # FSDP: every element on exactly one rank
