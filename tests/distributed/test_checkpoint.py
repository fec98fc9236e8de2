"""Distributed checkpoints: saved after 2 steps under one plan, resumed under another (resharded) for two
more steps, whose losses equal the uninterrupted single-process run's third and fourth (1e-5 relative: the
third is the loaded weights' forward, the fourth follows the step that uses the loaded optimizer state, so a
resume that lost the moments fails it); exported to one file, the weights equal (1e-5 of each tensor's largest entry) the single-process model after 2 steps; a
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
#: the uninterrupted run: 2 steps before the checkpoint, 2 after
STEPS = 4


def _steps(ranked, opt, which):
    out = []
    for i, (ids, tgt) in enumerate(batches(ranked.model.ir.vocab, STEPS)):
        if i in which:
            out.append(train_step(ranked, opt, shard_batch(ids, ranked), shard_batch(tgt, ranked)))
    return out


def _assert_resumed(losses, want):
    """The resumed run's losses equal the uninterrupted run's (RTOL relative each)."""
    assert len(losses) == len(want) == 2
    for i, (got, ref) in enumerate(zip(losses, want)):
        assert abs(got - ref) <= RTOL * abs(ref), f"resumed step {i}: loss {got} != {ref}"


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
    return step, _steps(ranked, opt, {2, 3})


PLANS = {"zero3-to-tp2": ({"zero": 3}, {"tp": 2}), "tp2-to-zero2": ({"tp": 2}, {"zero": 2})}


@pytest.mark.parametrize("saved, resumed", PLANS.values(), ids=PLANS.keys())
def test_resume_under_another_plan(tmp_path, saved, resumed):
    ir = tp_small()
    ref_losses, _ = reference_run(ir, STEPS)
    path = tmp_path / "step-2"
    first, saved_weights = launch(_train_and_save, 2, (ir, plan_from(world=2, **saved), path))[0]
    assert first == pytest.approx(ref_losses[:2], rel=RTOL)
    assert not (tmp_path / "step-2.partial").exists()
    step, resumed_losses = launch(_resume, 2, (ir, plan_from(world=2, **resumed), path))[0]
    assert step == 2
    _assert_resumed(resumed_losses, ref_losses[2:])

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
    return step, _steps(ranked, opt, {2, 3})


@pytest.mark.parametrize("saved, resumed", LAID_OUT_PLANS.values(), ids=LAID_OUT_PLANS.keys())
def test_tp_laid_out_rows_resume_under_another_plan(tmp_path, saved, resumed):
    """Fused projections split by segments (Mamba-2, Gated DeltaNet, KDA, short_conv) and MQA's KV head
    replicated over the tp ranks are saved in their stored layout: the checkpoint resumes under another plan
    with the uninterrupted run's third and fourth losses (1e-5 relative, float64), from 2 ranks to 1 and from
    4 to 2, and exports the saved weights (cast to the spec's fp32) exactly."""
    assert_resumes_and_exports64(tmp_path, ltmdsl.loads(LAID_OUT).ir.model(), saved, resumed)


def assert_resumes_and_exports64(tmp_path, ir, saved, resumed, timeout_s: float = 60.0):
    """Train 2 steps in float64 under `saved` = (world, plan degrees), save; resume under `resumed`: the first
    two losses and the resumed two equal the single-process run's (RTOL), and the export holds exactly the
    saved weights (cast to the spec's dtype)."""
    ref_losses, _ = reference_run(ir, STEPS, dtype=torch.float64)
    path = tmp_path / "step-2"
    (world, degrees), (world2, degrees2) = saved, resumed
    first, saved_weights = launch(_train_and_save64, world, (ir, plan_from(world=world, **degrees), path),
                                  timeout_s=timeout_s)[0]
    assert first == pytest.approx(ref_losses[:2], rel=RTOL)
    step, resumed_losses = launch(_resume64, world2, (ir, plan_from(world=world2, **degrees2), path),
                                  timeout_s=timeout_s)[0]
    assert step == 2
    _assert_resumed(resumed_losses, ref_losses[2:])

    out = dcp_ckpt.export(path, ir, tmp_path / "model.safetensors")
    exported = dict(ltmdsl.load_checkpoint(out).named_parameters())
    assert set(exported) == set(saved_weights)
    for name, p in saved_weights.items():
        assert torch.equal(exported[name], p.to(exported[name].dtype)), name  # the spec's dtype


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
    in the first stage), resumed on 2 ranks under ZeRO 3 or under ep alone: the next two losses equal the
    uninterrupted single-process run (1e-5), and the exported weights every stage saved."""
    ir = tiny_hybrid()
    ref_losses, _ = reference_run(ir, STEPS)
    path = tmp_path / "step-2"
    saved = launch(_train_and_save, 4, (ir, plan_from(world=4, pp=2, dp=2, ep=2, microbatches=2), path),
                   timeout_s=120)
    assert saved[0][0] == pytest.approx(ref_losses[:2], rel=RTOL)
    weights = {}
    for _, w in saved:
        weights.update(w)
    step, resumed_losses = launch(_resume, 2, (ir, plan_from(world=2, **resumed), path), timeout_s=120)[0]
    assert step == 2
    _assert_resumed(resumed_losses, ref_losses[2:])
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
    checkpoint resumes (under ep alone) with the uninterrupted run's second and third losses."""
    import time

    ir = tiny_hybrid()
    path = tmp_path / "latest"
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 died without a result \(exit code 7\)|rank \d failed"):
        launch(_die_inside_a_stage, 4, (ir, plan_from(world=4, pp=2, dp=2, ep=2, microbatches=2), path),
               timeout_s=60)
    assert time.monotonic() - start < 60
    assert dcp_ckpt.read_info(path, ir)["step"] == 1
    ref_losses, _ = reference_run(ir, steps=3)
    step, resumed_losses = launch(_resume_at, 2, (ir, plan_from(world=2, ep=2), path, 1), timeout_s=120)[0]
    assert step == 1
    _assert_resumed(resumed_losses, ref_losses[1:3])


def _resume_at(ir, plan, path, step):
    ranked = parallelize(ir, plan, seed=7)
    opt = ranked.optimizer(lr=LR)
    loaded = dcp_ckpt.load(ranked, opt, path)
    return loaded, _steps(ranked, opt, {step, step + 1})


#: (world, saved plan, world, resumed plan) under ZeRO 1 (the distributed optimizer): tiny-hybrid's stack, and
#: the laid-out rows' model under tp (rank-major fused rows, the MQA KV head repeated)
ZERO1_PLANS = {
    "dp2-zero1-to-one-process": (tiny_hybrid, (2, {"zero": 1}), (1, {})),
    "dp2-zero1-to-dp4-zero1": (tiny_hybrid, (2, {"zero": 1}), (4, {"zero": 1})),
    "dp2-zero1-to-zero3": (tiny_hybrid, (2, {"zero": 1}), (2, {"zero": 3})),
    "zero3-to-dp4-zero1": (tiny_hybrid, (2, {"zero": 3}), (4, {"zero": 1})),
    "one-process-to-dp2-zero1": (tiny_hybrid, (1, {}), (2, {"zero": 1})),
    "pp2-dp2-zero1-to-dp2-zero1": (tiny_hybrid, (4, {"pp": 2, "dp": 2, "zero": 1, "microbatches": 2}),
                                   (2, {"zero": 1})),
    "dp2-zero1-to-pp2-dp2-zero1": (tiny_hybrid, (2, {"zero": 1}),
                                   (4, {"pp": 2, "dp": 2, "zero": 1, "microbatches": 2})),
    "dp2-tp2-zero1-to-tp2": (lambda: ltmdsl.loads(LAID_OUT).ir.model(), (4, {"tp": 2, "zero": 1}), (2, {"tp": 2})),
    "tp2-to-dp2-tp2-zero1": (lambda: ltmdsl.loads(LAID_OUT).ir.model(), (2, {"tp": 2}), (4, {"tp": 2, "zero": 1})),
}


@pytest.mark.parametrize("model, saved, resumed", ZERO1_PLANS.values(), ids=ZERO1_PLANS.keys())
def test_zero1_checkpoint_resumes_under_another_plan(tmp_path, model, saved, resumed):
    """ZeRO 1's state is saved in the single-process layout (each parameter's exp_avg / exp_avg_sq under its
    name), so a checkpoint written under the distributed optimizer (alone, with tp, inside pipeline stages)
    resumes under one process, more or fewer dp ranks, ZeRO 3, and the other way round, with the uninterrupted
    run's third and fourth losses (float64, 1e-5 relative); and exports the saved weights."""
    ir = model()
    ref_losses, _ = reference_run(ir, STEPS, dtype=torch.float64)
    path = tmp_path / "step-2"
    (world, degrees), (world2, degrees2) = saved, resumed
    saved_ranks = launch(_train_and_save64, world, (ir, plan_from(world=world, **degrees), path), timeout_s=120)
    assert saved_ranks[0][0] == pytest.approx(ref_losses[:2], rel=RTOL)
    weights = {}
    for _, w in saved_ranks:  # under pp each stage its own
        weights.update(w)
    step, resumed_losses = launch(_resume64, world2, (ir, plan_from(world=world2, **degrees2), path), timeout_s=120)[0]
    assert step == 2
    _assert_resumed(resumed_losses, ref_losses[2:])

    exported = dict(ltmdsl.load_checkpoint(dcp_ckpt.export(path, ir, tmp_path / "m.safetensors")).named_parameters())
    assert set(exported) == set(weights)
    for name, p in weights.items():
        assert torch.equal(exported[name], p.to(exported[name].dtype)), name  # the spec's fp32


def _saved_keys(path) -> dict[str, tuple]:
    """Every entry of a DCP checkpoint: its key -> the whole tensor's size (None for a non-tensor)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: tuple(getattr(m, "size", ())) or None for k, m in meta.items()}


def test_zero1_checkpoint_has_the_single_process_layout(tmp_path):
    """The entries (keys and whole sizes) a dp 2 x ZeRO 1 run writes are those of one process's plain AdamW."""
    ir = tiny_hybrid()
    launch(_train_and_save64, 1, (ir, plan_from(world=1), tmp_path / "one"))
    launch(_train_and_save64, 2, (ir, plan_from(world=2, zero=1), tmp_path / "zero1"))
    one, zero1 = _saved_keys(tmp_path / "one"), _saved_keys(tmp_path / "zero1")
    assert any(k.startswith("optimizer.state.") and k.endswith(".exp_avg_sq") for k in one)
    assert zero1 == one
