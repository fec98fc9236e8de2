"""Sequence parallelism (sp = true; ltmdsl.distributed.sequence_parallel): under tp the residual stream and
the norms of each rank hold T/t of its tokens, the mixers gather them. Loss of the first 3 steps and the
first step's gradients equal one process within 1e-5 relative, in float64 (so the comparison sees the
split, not fp32 rounding), at tp = 2 per kind, on tiny-hybrid with every kind, and with dp x tp (ZeRO 3)
and tp x cp (balanced and contiguous) on 4 ranks. The stream is checked to be sequence-sharded."""

from __future__ import annotations

import pytest
import torch
from dist_cases import B, STEPS, T, assert_matches_reference, rank_run, reference_run, tp_small
from test_tensor_parallel import HEAD_SPLIT, MOE_SPEC
from test_tensor_parallel_fused import FUSED, model, tiny_hybrid_splittable

import ltmdsl
from ltmdsl.distributed import launch, plan_from
from ltmdsl.distributed.plan import plan_errors

RTOL = 1e-5


def _assert_matches(ir, world: int, degrees: dict) -> None:
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    plan = plan_from(world=world, sequence_parallel=True, **degrees)
    results = launch(rank_run, world, (ir, plan, STEPS, torch.float64))
    assert_matches_reference(results, (ref_losses, ref_grads), RTOL, same_names=False)


KINDS = {**{name: model(layer) for name, layer in FUSED.items() if name in (
            "mamba2", "mamba", "gated_deltanet", "kda", "short_conv", "lightning", "parallel-attention-mamba2")},
         **{name: model(layer) for name, layer in HEAD_SPLIT.items() if name in ("mlstm", "rg_lru", "mla")}}


@pytest.mark.parametrize("name", list(KINDS) + ["attention-mlp", "moe"])
def test_sp_kind_matches_one_process(name):
    """Each kind twice with an MLP (attention + MLP with biases and a window; MoE with a shared expert,
    whose expert sums the kind reduces itself, so its output is cut to the rank's tokens) at tp = 2."""
    ir = KINDS.get(name) or (tp_small() if name == "attention-mlp" else ltmdsl.loads(MOE_SPEC).ir.model())
    _assert_matches(ir, 2, {"tp": 2})


def test_sp_tiny_hybrid_every_kind_matches_one_process():
    _assert_matches(tiny_hybrid_splittable(), 2, {"tp": 2})


COMBINED = {"dp2-tp2-zero3": {"tp": 2, "zero": 3}, "dp2-tp2-zero0": {"tp": 2, "zero": 0},
            "tp2-cp2-balanced": {"tp": 2, "cp": 2}, "tp2-cp2-contiguous": {"tp": 2, "cp": 2, "cp_split": "contiguous"}}


@pytest.mark.parametrize("degrees", COMBINED.values(), ids=COMBINED.keys())
def test_sp_composes_with_dp_and_cp(degrees):
    """On 4 ranks, a Mamba-2 + Gated DeltaNet parallel layer and attention + MLP: FSDP2 over the dp ranks
    (the norms' gradients summed over tp first), and cp's chunks split again over the tp ranks."""
    layers = model(FUSED["parallel-mamba2-deltanet"])
    _assert_matches(layers, 4, degrees)


def _stream_shapes(ir, plan):
    """On every rank: the token counts the first block's norm and the final norm's output see."""
    from ltmdsl.distributed import parallelize, shard_batch
    from dist_cases import batches

    ranked = parallelize(ir, plan, seed=0, dtype=torch.float64)
    seen = {}
    ranked.model.layers[1].norm.register_forward_hook(lambda m, a, out: seen.update(norm=out[0].shape[1]))
    ids, _ = batches(ir.vocab, 1)[0]
    hidden = ranked.model(shard_batch(ids, ranked), output="hidden")
    return seen["norm"], hidden.shape[1]


def test_stream_is_sequence_sharded():
    """With sp the norms see T/t tokens and the loss every token; without it the norms see all T."""
    ir = tp_small()
    assert launch(_stream_shapes, 2, (ir, plan_from(world=2, tp=2, sequence_parallel=True))) == [(T // 2, T)] * 2
    assert launch(_stream_shapes, 2, (ir, plan_from(world=2, tp=2))) == [(T, T)] * 2


def test_sp_needs_tp_to_divide_a_ranks_tokens():
    plan = plan_from(world=4, tp=2, cp=2, sequence_parallel=True, cp_split="contiguous")
    errors = plan_errors(tp_small(), plan, 4, batch=B, seq_len=22)
    assert errors == ["sp = true splits each rank's 11 tokens (the sequence of 22 / cp = 2) over tp = 2, which "
                      "does not divide them"]
    assert not plan_errors(tp_small(), plan_from(world=4, tp=2, cp=2, sequence_parallel=True), 4, batch=B,
                           seq_len=T)


def test_sp_with_pp_is_a_plan_that_runs():
    """Sequence parallelism inside pipeline stages runs (tests/distributed/test_pipeline.py); the plan check
    asks of it only what sp asks alone: tp divides a rank's tokens."""
    assert not plan_errors(tp_small(), plan_from(world=4, tp=2, pp=2, sequence_parallel=True), 4, batch=B, seq_len=T)
    errors = plan_errors(tp_small(), plan_from(world=4, tp=2, pp=2, sequence_parallel=True), 4, batch=B, seq_len=23)
    assert errors == ["sp = true splits each rank's 23 tokens (the sequence of 23 / cp = 1) over tp = 2, which does "
                      "not divide them"]
