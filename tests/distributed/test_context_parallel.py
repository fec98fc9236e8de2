"""Context parallelism on tiny-hybrid (global attention, a window of 16, Mamba-1, Mamba-2, MLP, MoE):
the sequence of 24 tokens split over 2 ranks (load-balanced by default: 4 chunks of 6, rank 0 holding
chunks 0 and 3, rank 1 chunks 1 and 2; the window's halo and Mamba-2's chunk of 16 cross every cut), and
over 2 cp x 2 dp ranks; then tiny-hybrid with every kind over 2 and 4 ranks, balanced and contiguous. Loss
of the first 3 steps and first-step gradients equal one process within 1e-5 relative (fp32). A kind
without a context-parallel form is refused by name."""

from __future__ import annotations

import pytest
from dist_cases import assert_matches_reference, rank_run, reference_run, tiny_hybrid, tp_small
from helpers import assert_close
from paths import EXAMPLES

import ltmdsl
from ltmdsl.distributed import launch, plan_from
from ltmdsl.distributed.context_parallel import ContextParallelUnsupported, cp_forwards

RTOL = 1e-5


@pytest.fixture(scope="module")
def hybrid():
    ir = tiny_hybrid()
    return ir, reference_run(ir)


PLANS = {"cp2": (2, {"cp": 2}), "cp2-zero1": (2, {"cp": 2, "zero": 1}), "cp2-zero3-fsdp": (2, {"cp": 2, "zero": 3}),
         "dp2-cp2": (4, {"cp": 2, "dp": 2}), "cp2-contiguous": (2, {"cp": 2, "cp_split": "contiguous"})}


@pytest.mark.parametrize("world, degrees", PLANS.values(), ids=PLANS.keys())
def test_cp_matches_one_process(hybrid, world, degrees):
    ir, (ref_losses, ref_grads) = hybrid
    results = launch(rank_run, world, (ir, plan_from(world=world, **degrees)))
    assert_matches_reference(results, (ref_losses, ref_grads), RTOL, same_names=False)


@pytest.fixture(scope="module")
def every_kind():
    """tiny-hybrid as shipped: every mixer kind (attention, Mamba-1/2, Gated DeltaNet, KDA, short conv,
    lightning, RG-LRU, mLSTM, MLA) and both FFN kinds."""
    ir = ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm").ir.model()
    return ir, reference_run(ir)


@pytest.mark.parametrize("cp, split", [(2, "balanced"), (4, "balanced"), (4, "contiguous")],
                         ids=["cp2-balanced", "cp4-balanced", "cp4-contiguous"])
def test_cp_every_kind_matches_one_process(every_kind, cp, split):
    """24 tokens over 2 ranks and 4 ranks. Balanced: 2*cp chunks (of 6 and 3 tokens; at cp = 4 a chunk is
    exactly Mamba-1's K-1 = 3 conv halo), each rank's two chunks folded into the batch, the states composed
    over up to 7 earlier chunks, attention's queries of each chunk over every earlier key. Contiguous: 6
    tokens a rank. Measured: loss ~1e-7, gradients <= 5.2e-6 (Gated DeltaNet's dt_bias, whose carried state
    goes through the composed transition matrix)."""
    ir, (ref_losses, ref_grads) = every_kind
    results = launch(rank_run, cp, (ir, plan_from(world=cp, cp=cp, cp_split=split)), timeout_s=600)
    losses, grads = results[0]
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= RTOL * abs(want), f"step {i}: loss {got} != {want}"
    for name, g in ref_grads.items():
        assert_close(grads[name], g, RTOL, f"gradient of {name}")


def test_kind_without_a_cp_form_is_named(monkeypatch):
    import dataclasses

    from ltmdsl.distributed import context_parallel
    from ltmdsl.runtime.kinds import runtime_kind

    bare = dataclasses.replace(runtime_kind("short_conv"), cp_forward=None)
    monkeypatch.setattr(context_parallel, "runtime_kind", lambda name: bare if name == "short_conv" else runtime_kind(name))
    ir = ltmdsl.loads("model m {\n vocab = 32\n d_model = 16\n layer c = short_conv()\n stack { c }\n}\n").ir.model()
    with pytest.raises(ContextParallelUnsupported, match="no context-parallel form for kind 'short_conv'"):
        cp_forwards(ir)


def test_tp_x_cp_matches_one_process():
    """tp = 2 x cp = 2 on the attention + MLP model: heads split and K/V gathered across the sequence."""
    ir = tp_small()
    ref_losses, ref_grads = reference_run(ir)
    results = launch(rank_run, 4, (ir, plan_from(world=4, tp=2, cp=2)))
    losses, grads = results[0]
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= RTOL * abs(want), f"step {i}: loss {got} != {want}"
    for name, g in ref_grads.items():
        assert_close(grads[name], g, RTOL, f"gradient of {name}")


@pytest.mark.parametrize("cp", [2, 4], ids=["cp2", "cp4"])
def test_balanced_split_gives_every_rank_the_same_causal_work(cp):
    """Rank r holds chunks r and 2cp-1-r: its queries attend over (r+1) + (2cp-r) chunks of keys, the same
    on every rank (the contiguous split's last rank does 2cp-1 times the first's). Checked on the positions
    shard_sequence hands each rank: the (query, key) pairs of causal attention, sum over its queries of pos+1."""
    import torch

    from ltmdsl.distributed.context_parallel import shard_sequence

    T = 8 * cp
    positions = torch.arange(T)[None]  # [1, T]
    held = [shard_sequence(positions, r, cp, "balanced")[0] for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(T))  # every token on exactly one rank
    assert held[0][:T // (2 * cp)].tolist() == list(range(T // (2 * cp)))  # rank 0 starts with chunk 0
    work = {int((p + 1).sum()) for p in held}
    assert len(work) == 1, f"causal work per rank differs: {work}"
    contiguous = [int((shard_sequence(positions, r, cp, "contiguous")[0] + 1).sum()) for r in range(cp)]
    assert contiguous[-1] > contiguous[0]


def test_balanced_split_that_does_not_divide_the_sequence_is_refused():
    from ltmdsl.distributed.plan import PlanError, check_plan

    with pytest.raises(PlanError, match="2\\*cp = 8 chunks, which do not divide the sequence of 36 tokens"):
        check_plan(tiny_hybrid(), plan_from(world=4, cp=4), 4, seq_len=36)
    check_plan(tiny_hybrid(), plan_from(world=4, cp=4, cp_split="contiguous"), 4, seq_len=36)
