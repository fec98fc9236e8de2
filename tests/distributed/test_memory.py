"""Per-rank weight, gradient and optimizer bytes of a real step equal the memory model's per-GPU
prediction for the same plan (tiny-hybrid, fp32 weights and gradients, AdamW's m and v: 8 bytes of
optimizer state per parameter), exactly, on 2 ranks (pp x dp x zero 3 on 4).

Where torch's implementation and the memory model differ, the test says so rather than hides it:
  zero 1  the distributed optimizer cuts the rank's parameters, laid end to end, into N contiguous shards
          of ceil(P/N): P*o/N exactly (tiny-hybrid's P is even)
  ep      (ep = dp = 2, zero 0) each rank holds the dense parameters and half the experts: exact
  cp, pp  (zero 0) cp ranks hold the whole model; the most loaded pipeline stage is the prediction: exact,
          and under pp x dp x zero 3 (FSDP2 on each stage's modules) that stage's shard on each dp rank;
          under pp x ep (each stage's experts split over its 2 dp ranks) and pp x zero 1 (each stage's
          optimizer state sharded over its 2 dp ranks) likewise exact
  zero 2  FSDP2 keeps only the weight shard between steps (P*w/N) where the ZeRO paper keeps P*w
  zero 3  the shard between steps; the model's per-step weights add FSDP2's root (everything outside the
          mixers), which stays gathered from the forward through the backward
  tp      a model per kind with a tensor-parallel plan (biases, post-norms and shared gates included): split
          parameters / t, what the plan replicates (norms, row-parallel biases, MLA's latent projections, the
          MoE router) whole on every rank: exact, on 2 ranks and dp x tp with zero 3 on 4
"""

from __future__ import annotations

import pytest
from dist_cases import LR, batches, tiny_hybrid

import ltmdsl
from ltmdsl.distributed import launch, parallelize, plan_from, shard_batch, train_step
from ltmdsl.distributed.memory import COMPONENTS, rank_state_bytes
from ltmdsl.memory import report


def _measure(ir, plan):
    ranked = parallelize(ir, plan, seed=0)
    opt = ranked.optimizer(lr=LR)
    ids, tgt = batches(ir.vocab, 1)[0]
    train_step(ranked, opt, shard_batch(ids, ranked), shard_batch(tgt, ranked))
    biggest = max(p.numel() for p in ranked.model.parameters())
    return rank_state_bytes(ranked.model, opt), biggest


def _report(ir, plan):
    return report(ir, None, mode="training", gpus=plan.world, dp=plan.dp, tp=plan.tp, ep=plan.ep, etp=plan.etp, cp=plan.cp,
                  pp=plan.pp, microbatches=plan.microbatches, zero=plan.zero,
                  weight_dtype="fp32", grad_dtype="fp32", optimizer_bytes_per_param=8, context=64, batch=2)


def _predicted(ir, plan) -> dict[str, int]:
    r = _report(ir, plan)
    return {c: r.per_gpu_components[c] for c in COMPONENTS}


def _norms(ir) -> int:
    """Parameters of every norm: the sub-layers' and the final one."""
    return ir.final_norm_params + sum(
        (layer.norm.params_per_channel + (layer.post_norm.params_per_channel if layer.post_norm else 0)) * ir.d_model
        for layer in ir.unique_layers())


def _gathered_root(ir, plan) -> int:
    """fp32 bytes of the ZeRO-3 root (embedding, head, norms) of the memory model's most loaded stage."""
    from ltmdsl.memory.assemble import fsdp_root_params, stage_ranges

    r = report(ir, None, mode="training", gpus=plan.world, dp=plan.dp, pp=plan.pp, microbatches=plan.microbatches,
               zero=plan.zero, weight_dtype="fp32", grad_dtype="fp32", optimizer_bytes_per_param=8, context=64, batch=2)
    i = r.most_loaded_stage
    split, replicated = fsdp_root_params(ir, stage_ranges(len(ir.layers), plan.pp)[i], i == 0, i == plan.pp - 1)
    return 4 * (split // plan.tp + replicated)


def _fsdp_root(ir) -> int:
    """Parameters outside every mixer (FSDP2's root under ZeRO-3): embedding, head and the norms."""
    return ir.embedding_params + ir.head_params + _norms(ir)


@pytest.mark.parametrize("zero", [0, 1, 2, 3], ids=["zero0", "zero1", "zero2", "zero3"])
def test_rank_bytes_equal_the_memory_model(zero):
    ir = tiny_hybrid()
    plan = plan_from(world=2, zero=zero)
    want = _predicted(ir, plan)
    measured = launch(_measure, 2, (ir, plan))
    per_rank = [m for m, _ in measured]
    P = ir.params_total
    assert want["gradients"] == (4 * P if zero < 2 else 4 * P // 2)  # the model's own arithmetic, stated
    for got in per_rank:
        assert got["gradients"] == want["gradients"]
        if zero == 2:
            assert want["weights"] == 4 * P and got["weights"] == 4 * P // 2  # FSDP2: sharded at rest
        elif zero == 3:  # sharded at rest; during the step the model adds FSDP2's root, gathered whole
            assert got["weights"] == 4 * P // 2 and want["weights"] == 4 * P // 2 + 4 * _fsdp_root(ir)
        else:
            assert got["weights"] == want["weights"]
        assert got["optimizer"] == want["optimizer"]
    if zero == 1:
        assert P % 2 == 0 and want["optimizer"] == 8 * P // 2


@pytest.mark.parametrize("world, degrees", [(2, {"ep": 2}), (2, {"cp": 2}), (2, {"pp": 2, "microbatches": 2}),
                                            (4, {"pp": 2, "dp": 2, "zero": 3, "microbatches": 2}),
                                            (4, {"pp": 2, "dp": 2, "ep": 2, "microbatches": 2}),
                                            (4, {"pp": 2, "dp": 2, "zero": 1, "microbatches": 2})],
                         ids=["ep2", "cp2", "pp2", "pp2-dp2-zero3", "pp2-dp2-ep2", "pp2-dp2-zero1"])
def test_rank_bytes_under_ep_cp_pp_equal_the_memory_model(world, degrees):
    ir = tiny_hybrid()
    plan = plan_from(world=world, **degrees)
    want = _predicted(ir, plan)
    measured = [got for got, _ in launch(_measure, world, (ir, plan))]
    if degrees.get("zero") == 3:  # at rest FSDP2 holds the shards; the model's step adds the root, gathered
        want = dict(want, weights=want["weights"] - _gathered_root(ir, plan))
    if "pp" in degrees:  # the memory model reports its most loaded stage: every rank of that stage holds it
        per_stage = world // plan.pp
        stage = _report(ir, plan).most_loaded_stage
        assert measured[stage * per_stage:(stage + 1) * per_stage] == [want] * per_stage
    else:
        assert all(got == want for got in measured)


TP_KINDS = {
    "attention": "attention(heads = 4, kv_heads = 2, qkv_bias = true, out_bias = true, gate = true)",
    "mla": "mla(heads = 4, q_lora_rank = 16, kv_lora_rank = 16, qk_nope_head_dim = 8, qk_rope_head_dim = 4, "
           "v_head_dim = 8, bias = true)",
    "mlp": "mlp(d_ff = 64, act = gelu, bias = true)",
    "moe": "moe(experts = 4, top_k = 2, d_ff = 16, shared_d_ff = 24, shared_gate = true, router_bias = true)",
    "mlstm": "mlstm(heads = 4, chunk = 8, bias = true)",
    "rg_lru": "rg_lru(heads = 4, chunk = 8)",
}


def tp_model(layer: str):
    """The kind's layer (with a post-norm) and a biased MLP, twice, untied head."""
    return ltmdsl.loads(f"model m {{\n vocab = 64\n d_model = 32\n dtype = fp32\n head = untied\n"
                        f" layer x = {layer[:-1]}, post_norm = rmsnorm(eps = 1e-6))\n"
                        " layer f = mlp(d_ff = 64, bias = true)\n stack { x f x f }\n}\n").ir.model()


@pytest.mark.parametrize("layer", TP_KINDS.values(), ids=TP_KINDS.keys())
def test_rank_bytes_under_tp_equal_the_memory_model(layer):
    """Each tp rank holds what the memory model predicts per GPU, exactly: the split parameters / t and the
    replicated ones whole (and more than P / t, which the memory model predicted before)."""
    ir = tp_model(layer)
    plan = plan_from(world=2, tp=2)
    want = _predicted(ir, plan)
    measured = [got for got, _ in launch(_measure, 2, (ir, plan))]
    assert all(got == want for got in measured), (measured, want)
    assert want["weights"] > 4 * ir.params_total / 2


def test_rank_bytes_under_dp_tp_zero3_equal_the_memory_model():
    """dp 2 x tp 2, zero 3: FSDP2 cuts dim 0 with torch.chunk, so a tensor whose first dim dp does not divide
    (the shared gate's [1, d]) leaves the dp ranks a few rows apart; their sum is the prediction exactly."""
    ir = tp_model(TP_KINDS["moe"])
    plan = plan_from(world=4, tp=2, zero=3)
    want = _predicted(ir, plan)
    measured = [got for got, _ in launch(_measure, 4, (ir, plan))]
    # at rest (after the step) FSDP2 holds only the shards: the root it gathers for the step (the embedding and
    # head / t, the norms whole) is the model's weights beyond them
    at_rest = dict(want, weights=want["weights"] - 4 * ((ir.embedding_params + ir.head_params) // 2 + _norms(ir)))
    for c in COMPONENTS:
        assert sum(got[c] for got in measured) == 4 * at_rest[c], (c, measured, want)
