"""Pipeline parallelism on tiny-hybrid: 2 stages cut where the memory model cuts them (4 + 4 sub-layers),
the 1F1B schedule over 2 micro-batches, alone, with dp = 2, with ZeRO 2 / 3 (FSDP2 on each stage's modules),
interleaved, with cp = 2 (each stage's ranks split the sequence, load-balanced); and the attention + MLP
model with tp = 2 inside each stage (alone and with ZeRO 3). Loss of the first 3 steps and first-step
gradients (each stage's, merged) equal one process within 1e-5 relative (fp32; measured ~1e-7).

Inside each stage of 2 dp ranks also expert parallelism (ep = dp = 2: each stage's MoE experts split over
its dp ranks, tokens exchanged all-to-all within the stage, micro-batch by micro-batch) and ZeRO 1 (the
distributed optimizer: each stage's optimizer state sharded over its dp ranks), in float64 on tiny-hybrid's
stack and on tiny-jamba (a MoE in every stage), within 1e-5 relative."""

from __future__ import annotations

import pytest
import torch
from dist_cases import (
    B, STEPS, T, assert_matches_reference, rank_run, rank_run_without_full_logits, reference_run, stage_grads,
    tiny_hybrid, tp_small)
from paths import EXAMPLES
from test_tensor_parallel_fused import tiny_hybrid_splittable

import ltmdsl
from ltmdsl.distributed import launch, plan_from
from ltmdsl.distributed.pipeline import PipelineUnsupported, check_pipeline

RTOL = 1e-5


@pytest.fixture(scope="module")
def hybrid():
    ir = tiny_hybrid()
    return ir, reference_run(ir)


PLANS = {"pp2-m2": (2, {"pp": 2, "microbatches": 2}), "pp2-dp2-m2": (4, {"pp": 2, "dp": 2, "microbatches": 2}),
         "pp2-interleave2-m2": (2, {"pp": 2, "interleave": 2, "microbatches": 2}),
         "pp2-zero2-m2": (2, {"pp": 2, "zero": 2, "microbatches": 2}),
         "pp2-dp2-zero3-m2": (4, {"pp": 2, "dp": 2, "zero": 3, "microbatches": 2}),
         "pp2-dp2-zero2-interleave2-m2": (4, {"pp": 2, "dp": 2, "zero": 2, "interleave": 2, "microbatches": 2}),
         "pp2-cp2-m2": (4, {"pp": 2, "cp": 2, "microbatches": 2})}


@pytest.mark.parametrize("world, degrees", PLANS.values(), ids=PLANS.keys())
def test_pp_matches_one_process(hybrid, world, degrees):
    ir, (ref_losses, ref_grads) = hybrid
    _assert_pipeline_matches(ir, ref_losses, ref_grads, world, degrees)


TP_PLANS = {"pp2-tp2-m2": {"pp": 2, "tp": 2, "microbatches": 2},
            "pp2-tp2-zero3-m2": {"pp": 2, "tp": 2, "zero": 3, "microbatches": 2}}


@pytest.mark.parametrize("degrees", TP_PLANS.values(), ids=TP_PLANS.keys())
def test_pp_x_tp_matches_one_process(degrees):
    """The attention + MLP model (untied head): 2 stages of 2 tp ranks each (heads and MLP width split; the
    last stage's loss vocab-parallel on its V/2 head rows: LTModel.head, which gathers [b, T, V] logits,
    is made to fail in the workers)."""
    ir = tp_small()
    _assert_pipeline_matches(ir, *reference_run(ir), 4, degrees, worker=rank_run_without_full_logits)


F64_PLANS = {"pp2-dp2-ep2-m2": {"pp": 2, "dp": 2, "ep": 2, "microbatches": 2},
             "pp2-dp2-zero1-m2": {"pp": 2, "dp": 2, "zero": 1, "microbatches": 2}}
F64_MODELS = {"tiny-hybrid-stack": tiny_hybrid,
              "tiny-jamba": lambda: ltmdsl.load(EXAMPLES / "tiny-jamba.ltm").ir.model()}


@pytest.mark.parametrize("degrees", F64_PLANS.values(), ids=F64_PLANS.keys())
@pytest.mark.parametrize("model", F64_MODELS.values(), ids=F64_MODELS.keys())
def test_pp_x_ep_and_pp_x_zero1_match_one_process_in_float64(model, degrees):
    """4 ranks: 2 stages of 2 dp ranks, each stage's experts split over them (ep) or its optimizer state
    (zero 1); float64 on both sides (the reference's loss too), so the bound (1e-5) is far above the rounding
    (measured on tiny-hybrid's stack: losses ~2e-16, gradients ~5e-15 relative)."""
    ir = model()
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    _assert_pipeline_matches(ir, ref_losses, ref_grads, 4, degrees, dtype=torch.float64, timeout_s=120)


def _assert_pipeline_matches(ir, ref_losses, ref_grads, world, degrees, worker=rank_run, dtype=None,
                             timeout_s=60.0):
    plan = plan_from(world=world, **degrees)
    args = (ir, plan) if dtype is None else (ir, plan, 3, dtype)
    _assert_same(ir, ref_losses, ref_grads, launch(worker, world, args, timeout_s=timeout_s))


def _assert_same(ir, ref_losses, ref_grads, results):
    """Every rank's losses equal and within RTOL of the reference's; the stages' gradients, merged, too."""
    assert_matches_reference(results, (ref_losses, ref_grads), RTOL, grads=stage_grads(results))


def test_tied_embeddings_are_refused():
    ir = ltmdsl.loads("model m {\n vocab = 32\n d_model = 16\n head = tied\n layer f = mlp(d_ff = 32)\n"
                      " stack { f f }\n}\n").ir.model()
    with pytest.raises(PipelineUnsupported, match="tied embeddings"):
        check_pipeline(ir, 2)


def _run_recording_boundary(ir, plan, steps, dtype):
    """rank_run, recording the shape of every tensor a stage sends on (its forward's output, not the last
    stage's) in this forked worker; (losses, gradients, the sent shapes)."""
    from ltmdsl.distributed import pipeline

    sent = set()
    forward = pipeline.Stage.forward

    def recording(self, x):
        out = forward(self, x)
        if not self.last:
            sent.add(tuple(out.shape))
        return out

    pipeline.Stage.forward = recording  # this forked worker's class only
    losses, grads = rank_run(ir, plan, steps, dtype)
    return losses, grads, sent


SP_PLANS = {"pp2-tp2-sp-m2": (tiny_hybrid_splittable, {"microbatches": 2}),
            "pp2-tp2-sp-interleave2-m2": (tp_small, {"microbatches": 2, "interleave": 2})}


@pytest.mark.parametrize("model, degrees", SP_PLANS.values(), ids=SP_PLANS.keys())
def test_pp_x_tp_x_sp_matches_one_process_in_float64(model, degrees):
    """4 ranks: 2 stages of 2 tp ranks with sequence parallelism (tiny-hybrid with every kind, its Mamba-2
    given 2 groups; and the attention + MLP model interleaved, 4 virtual stages). A stage sends its rank's
    T/2 tokens of the residual stream (Megatron-LM sends the sequence-sharded tensor: t times fewer bytes
    over the stage boundary than gathering first, and the next stage's norms want exactly those tokens).
    Float64 on both sides; loss of 3 steps and the first step's gradients within 1e-5 relative (measured
    ~1e-14)."""
    ir = model()
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    plan = plan_from(world=4, pp=2, tp=2, sequence_parallel=True, **degrees)
    results = launch(_run_recording_boundary, 4, (ir, plan, STEPS, torch.float64), timeout_s=120)
    microbatch = B // plan.microbatches
    for _, _, sent in results:  # every stage but the last sends; pp rank 1 (ranks 2, 3) is the last unless interleaved
        assert sent <= {(microbatch, T // 2, ir.d_model)}, sent
    assert all(sent for _, _, sent in results[:2])
    _assert_same(ir, ref_losses, ref_grads, [(losses, grads) for losses, grads, _ in results])


def test_pp_x_tp_x_sp_rank_bytes_equal_the_memory_model():
    """The weights, gradients and optimizer state every rank of the memory model's most loaded stage holds
    after a step under pp 2 x tp 2 with sp (tiny-hybrid with every kind) equal its per-GPU prediction,
    exactly (sp moves activations, not states: the norms stay whole on every tp rank)."""
    from test_memory import _measure

    from ltmdsl.distributed.memory import COMPONENTS
    from ltmdsl.memory import report

    ir = tiny_hybrid_splittable()
    plan = plan_from(world=4, pp=2, tp=2, sequence_parallel=True, microbatches=2)
    r = report(ir, None, mode="training", gpus=4, dp=1, tp=2, pp=2, microbatches=2, sequence_parallel=True,
               zero=0, weight_dtype="fp32", grad_dtype="fp32", optimizer_bytes_per_param=8, context=T, batch=B)
    want = {c: r.per_gpu_components[c] for c in COMPONENTS}
    measured = [got for got, _ in launch(_measure, 4, (ir, plan), timeout_s=120)]
    stage = r.most_loaded_stage
    assert measured[2 * stage:2 * stage + 2] == [want] * 2, (measured, want)
