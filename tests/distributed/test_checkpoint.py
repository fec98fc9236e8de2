"""Distributed checkpoints: saved after 2 steps under one plan, resumed under another (resharded), the
third step's loss equals the uninterrupted single-process run (1e-5 relative: it needs the optimizer
state too); exported to one file, the weights equal (1e-5 of each tensor's largest entry) the single-process model after 2 steps; a
checkpoint of another spec is refused before a tensor is read."""

from __future__ import annotations

import pytest
import torch
from dist_cases import LR, TP_SPEC, batches, reference_run, tiny_hybrid, tp_small

import ltmdsl
from ltmdsl.distributed import WorkerError, launch, parallelize, plan_from, shard_batch, train_step
from ltmdsl.distributed import checkpoint as dcp_ckpt
from ltmdsl.distributed.step import full_parameters

RTOL = 1e-5


def _steps(ranked, opt, which):
    out = []
    for i, (ids, tgt) in enumerate(batches(ranked.model.ir.vocab, 3)):
        if i in which:
            out.append(train_step(ranked, opt, shard_batch(ids, ranked), shard_batch(tgt, ranked)))
    return out


def _train_and_save(ir, plan, path):
    ranked = parallelize(ir, plan, seed=0)
    opt = ranked.optimizer(lr=LR)
    losses = _steps(ranked, opt, {0, 1})
    dcp_ckpt.save(ranked, opt, path, step=2)
    return losses, full_parameters(ranked.model)


def _resume(ir, plan, path):
    ranked = parallelize(ir, plan, seed=7)  # other weights: the checkpoint must overwrite them all
    opt = ranked.optimizer(lr=LR)
    step = dcp_ckpt.load(ranked, opt, path)
    return step, _steps(ranked, opt, {2})


PLANS = {"zero3-to-tp2": ({"zero": 3}, {"tp": 2}), "tp2-to-zero2": ({"tp": 2}, {"zero": 2})}


@pytest.mark.parametrize("saved, resumed", PLANS.values(), ids=PLANS.keys())
def test_resume_under_another_plan(tmp_path, saved, resumed):
    ir = tp_small()
    ref_losses, _ = reference_run(ir)
    path = tmp_path / "step-2"
    first, saved_weights = launch(_train_and_save, 2, (ir, plan_from(world=2, **saved), path))[0]
    assert first == pytest.approx(ref_losses[:2], rel=RTOL)
    assert not (tmp_path / "step-2.partial").exists()
    step, (third,) = launch(_resume, 2, (ir, plan_from(world=2, **resumed), path))[0]
    assert step == 2
    assert abs(third - ref_losses[2]) <= RTOL * abs(ref_losses[2]), f"resumed loss {third} != {ref_losses[2]}"

    out = dcp_ckpt.export(path, ir, tmp_path / "model.safetensors")
    exported = dict(ltmdsl.load_checkpoint(out).named_parameters())
    assert set(exported) == set(saved_weights)
    for name, p in saved_weights.items():
        assert torch.equal(exported[name], p), name


LAID_OUT = """
model laid_out {
    vocab = 64
    d_model = 32
    dtype = fp32
    head = untied
    layer ssm = mamba2(d_state = 8, head_dim = 8, expand = 2, n_groups = 2, chunk = 8, proj_bias = true)
    layer dn = gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 8, chunk = 8)
    layer kda = kda(heads = 2, head_dim = 8, chunk = 8)
    layer conv = short_conv(kernel = 3, bias = true)
    layer mqa = attention(heads = 4, kv_heads = 1, qkv_bias = true, sinks = true)
    layer f = mlp(d_ff = 64)
    stack { ssm f dn f kda f conv f mqa f }
}
"""

#: (world, saved plan, world, resumed plan): tp 2 lays fused rows out rank-major and repeats MQA's KV head
LAID_OUT_PLANS = {"tp2-to-dp2": ((2, {"tp": 2}), (2, {"zero": 2})), "tp2-to-tp1": ((2, {"tp": 2}), (1, {})),
                  "zero3-to-tp2": ((2, {"zero": 3}), (2, {"tp": 2})),
                  "dp2-tp2-zero3-to-tp2": ((4, {"tp": 2, "zero": 3}), (2, {"tp": 2}))}


def _train_and_save64(ir, plan, path):
    ranked = parallelize(ir, plan, seed=0, dtype=torch.float64)
    opt = ranked.optimizer(lr=LR)
    losses = _steps(ranked, opt, {0, 1})
    dcp_ckpt.save(ranked, opt, path, step=2)
    return losses, full_parameters(ranked.model)


def _resume64(ir, plan, path):
    ranked = parallelize(ir, plan, seed=7, dtype=torch.float64)
    opt = ranked.optimizer(lr=LR)
    step = dcp_ckpt.load(ranked, opt, path)
    return step, _steps(ranked, opt, {2})


@pytest.mark.parametrize("saved, resumed", LAID_OUT_PLANS.values(), ids=LAID_OUT_PLANS.keys())
def test_tp_laid_out_rows_resume_under_another_plan(tmp_path, saved, resumed):
    """Fused projections split by segments (Mamba-2, Gated DeltaNet, KDA, short_conv) and MQA's KV head
    replicated over the tp ranks are saved in their stored layout: the checkpoint resumes under another plan
    with the uninterrupted run's third loss (1e-5 relative, float64), from 2 ranks to 1 and from 4 to 2, and
    exports the saved weights (cast to the spec's fp32) exactly."""
    ir = ltmdsl.loads(LAID_OUT).ir.model()
    ref_losses, _ = reference_run(ir, dtype=torch.float64)
    path = tmp_path / "step-2"
    (world, degrees), (world2, degrees2) = saved, resumed
    first, saved_weights = launch(_train_and_save64, world, (ir, plan_from(world=world, **degrees), path))[0]
    assert first == pytest.approx(ref_losses[:2], rel=RTOL)
    step, (third,) = launch(_resume64, world2, (ir, plan_from(world=world2, **degrees2), path))[0]
    assert step == 2
    assert abs(third - ref_losses[2]) <= RTOL * abs(ref_losses[2]), f"resumed loss {third} != {ref_losses[2]}"

    out = dcp_ckpt.export(path, ir, tmp_path / "model.safetensors")
    exported = dict(ltmdsl.load_checkpoint(out).named_parameters())
    assert set(exported) == set(saved_weights)
    for name, p in saved_weights.items():
        assert torch.equal(exported[name], p.to(exported[name].dtype)), name  # the spec's fp32


def test_checkpoint_of_another_spec_is_refused(tmp_path):
    ir = tp_small()
    path = tmp_path / "ck"
    launch(_train_and_save, 2, (ir, plan_from(world=2, zero=3), path))
    other = ltmdsl.loads(TP_SPEC.replace("vocab = 96", "vocab = 97")).ir.model()
    with pytest.raises(dcp_ckpt.CheckpointError, match="not of model 'tp_small'"):
        dcp_ckpt.read_info(path, other)


def _die_while_saving_again(ir, plan, path):
    import os

    import torch.distributed as dist

    ranked = parallelize(ir, plan, seed=0)
    opt = ranked.optimizer(lr=LR)
    _steps(ranked, opt, {0})
    dcp_ckpt.save(ranked, opt, path, step=1)
    _steps(ranked, opt, {1})
    if dist.get_rank() == 1:
        os._exit(5)  # dies before its shards of the next checkpoint exist
    dcp_ckpt.save(ranked, opt, path, step=2)  # rank 0 waits for a dead peer
    return "unreachable"


def test_a_rank_dying_mid_save_leaves_the_last_checkpoint_intact(tmp_path):
    ir = tp_small()
    path = tmp_path / "latest"
    with pytest.raises(WorkerError, match=r"rank 1 died|rank 0 failed"):  # whichever the parent hears first
        launch(_die_while_saving_again, 2, (ir, plan_from(world=2, zero=3), path), timeout_s=20)
    assert dcp_ckpt.read_info(path, ir)["step"] == 1
    step, _ = launch(_resume, 2, (ir, plan_from(world=2, zero=3), path))[0]
    assert step == 1


EP_RESUMES = {"pp2-dp2-ep2-to-zero3": {"zero": 3}, "pp2-dp2-ep2-to-ep2": {"ep": 2}}


@pytest.mark.parametrize("resumed", EP_RESUMES.values(), ids=EP_RESUMES.keys())
def test_resume_from_pp_x_ep_under_another_plan(tmp_path, resumed):
    """Saved under 2 stages x 2 dp ranks with each stage's experts split over them (tiny-hybrid's stack: a MoE
    in the first stage), resumed on 2 ranks under ZeRO 3 or under ep alone: the third loss equals the
    uninterrupted single-process run (1e-5), and the exported weights every stage saved."""
    ir = tiny_hybrid()
    ref_losses, _ = reference_run(ir)
    path = tmp_path / "step-2"
    saved = launch(_train_and_save, 4, (ir, plan_from(world=4, pp=2, dp=2, ep=2, microbatches=2), path),
                   timeout_s=120)
    assert saved[0][0] == pytest.approx(ref_losses[:2], rel=RTOL)
    weights = {}
    for _, w in saved:
        weights.update(w)
    step, (third,) = launch(_resume, 2, (ir, plan_from(world=2, **resumed), path), timeout_s=120)[0]
    assert step == 2
    assert abs(third - ref_losses[2]) <= RTOL * abs(ref_losses[2]), f"resumed loss {third} != {ref_losses[2]}"
    exported = dict(ltmdsl.load_checkpoint(dcp_ckpt.export(path, ir, tmp_path / "m.safetensors")).named_parameters())
    assert set(exported) == set(weights) == {n for n, _ in ltmdsl.build(ir).named_parameters()}
    for name, p in weights.items():
        assert torch.equal(exported[name], p), name


def _die_inside_a_stage(ir, plan, path):
    """pp x ep: checkpoint after step 1; in step 2 rank 1 (first stage, dp rank 1) dies inside its MoE's
    forward, between the all-to-alls its stage peer waits on."""
    import os

    import torch.distributed as dist

    ranked = parallelize(ir, plan, seed=0)
    opt = ranked.optimizer(lr=LR)
    _steps(ranked, opt, {0})
    dcp_ckpt.save(ranked, opt, path, step=1)
    if dist.get_rank() == 1:
        moe = next(m for m in ranked.model.modules() if type(m).__name__ == "MoE")
        moe.router.register_forward_hook(lambda *_: os._exit(7))
    _steps(ranked, opt, {1})
    return "unreachable"


def test_a_rank_dying_inside_a_pipeline_stage_ends_the_run_and_keeps_the_checkpoint(tmp_path):
    """The others do not hang: the run ends within the timeout with an error naming a rank, and the step-1
    checkpoint resumes (under ep alone) with the uninterrupted run's second loss."""
    import time

    ir = tiny_hybrid()
    path = tmp_path / "latest"
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 died without a result \(exit code 7\)|rank \d failed"):
        launch(_die_inside_a_stage, 4, (ir, plan_from(world=4, pp=2, dp=2, ep=2, microbatches=2), path),
               timeout_s=60)
    assert time.monotonic() - start < 60
    assert dcp_ckpt.read_info(path, ir)["step"] == 1
    ref_losses, _ = reference_run(ir, steps=2)
    step, (second,) = launch(_resume_at, 2, (ir, plan_from(world=2, ep=2), path, 1), timeout_s=120)[0]
    assert step == 1
    assert abs(second - ref_losses[1]) <= RTOL * abs(ref_losses[1])


def _resume_at(ir, plan, path, step):
    ranked = parallelize(ir, plan, seed=7)
    opt = ranked.optimizer(lr=LR)
    loaded = dcp_ckpt.load(ranked, opt, path)
    return loaded, _steps(ranked, opt, {step})
