"""Expert parallelism on tiny-hybrid: ep = dp = 2, the MoE's 4 experts split 2 per rank, tokens sent to
their experts and back all-to-all (uneven splits). Loss of the first 3 steps and first-step gradients
(the experts' gathered from their ranks) equal one process within 1e-5 relative (measured ~1e-7); likewise
every MoE variant ep runs (routings, clamped SwiGLU, weighted inputs, shared expert) in float64."""

from __future__ import annotations

import pytest
from dist_cases import assert_matches_reference, batches, rank_run, reference_run, tiny_hybrid
from helpers import assert_close

from ltmdsl.distributed import launch, plan_from

RTOL = 1e-5


def test_ep_matches_one_process():
    ir = tiny_hybrid()
    ref_losses, ref_grads = reference_run(ir)
    results = launch(rank_run, 2, (ir, plan_from(world=2, ep=2)))
    assert_matches_reference(results, (ref_losses, ref_grads), RTOL, same_names=False)


ROUTE_BIAS = (10.0, 10.0, 0.0, 0.0)  # every token's top 2 are experts 0 and 1: all on rank 0 under ep = 2


def _route_to_rank_0(model):
    """Add ROUTE_BIAS to every router's logits (a forward hook: the router keeps its weights and gradients)."""
    import torch

    for m in model.modules():
        if type(m).__name__ == "MoE":
            m.router.register_forward_hook(lambda mod, args, out: out + torch.tensor(ROUTE_BIAS, dtype=out.dtype))


def _skewed_rank(ir, plan):
    from ltmdsl.distributed import parallelize, shard_batch
    from ltmdsl.distributed.step import forward_backward, full_gradients

    ranked = parallelize(ir, plan, seed=0)
    _route_to_rank_0(ranked.model)
    ids, tgt = batches(ir.vocab, 1)[0]
    loss = forward_backward(ranked, shard_batch(ids, ranked), shard_batch(tgt, ranked))
    return loss, full_gradients(ranked.model)


def test_a_rank_receiving_no_tokens_takes_part_in_the_backward():
    """Every token routed to rank 0's experts: rank 1 receives no rows, yet its backward still runs both
    all-to-alls (it used to skip them and leave rank 0 waiting: a hang). Loss and gradients equal one process
    (1e-5 relative); rank 1's experts a zero gradient, as the stacked expert weights of one process."""
    import torch

    from ltmdsl.runtime.build import build

    ir = tiny_hybrid()
    model = build(ir, seed=0)
    _route_to_rank_0(model)
    ids, tgt = batches(ir.vocab, 1)[0]
    ref = model.loss(ids, tgt)
    ref.backward()
    results = launch(_skewed_rank, 2, (ir, plan_from(world=2, ep=2)), timeout_s=60)
    (loss, grads), _ = results
    assert abs(loss - ref.item()) <= RTOL * abs(ref.item())
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close(grads[name], p.grad, RTOL, f"gradient of {name}")
    up = grads[next(n for n in grads if n.endswith("experts.up_proj"))]
    assert not torch.any(up[2:]), "experts 2 and 3 received tokens: the routing did not skew"


VARIANTS = {
    "qwen-shared-gate": "moe(experts = 4, top_k = 2, d_ff = 16, routing = softmax_topk, shared_d_ff = 24, "
                        "shared_gate = true)",
    "deepseek-v3-routing": "moe(experts = 4, top_k = 2, d_ff = 16, routing = sigmoid_topk_renorm, groups = 2, "
                           "top_groups = 1, selection_bias = true, routed_scale = 2.5, shared_d_ff = 16)",
    "gpt-oss-clamped": "moe(experts = 4, top_k = 2, d_ff = 16, act = swiglu_clamped, routing = topk_softmax, "
                       "router_bias = true)",
    "llama4-weighted-input": "moe(experts = 4, top_k = 1, d_ff = 16, routing = sigmoid_topk, weight_input = true, "
                             "shared_d_ff = 16)",
}


def variant_model(layer: str):
    """tp_small's attention and MLP around two uses of the MoE `layer`."""
    import ltmdsl
    from dist_cases import TP_SPEC

    return ltmdsl.loads(TP_SPEC.replace("    stack { attn ffn swa gelu }",
                                        f"    layer e = {layer}\n    stack {{ attn e gelu e }}")).ir.model()


@pytest.mark.parametrize("layer", VARIANTS.values(), ids=VARIANTS.keys())
def test_ep_runs_every_routing_and_the_shared_expert(layer):
    """ep = dp = 2 on MoEs beyond the plain one: the routings (softmax / sigmoid, grouped, selection bias, routed
    scale), the clamped SwiGLU, weighted inputs and the shared expert (dense, on each rank's tokens). Losses of 3
    steps and first-step gradients equal one process within 1e-5 relative in float64 (measured ~1e-15)."""
    import torch

    ir = variant_model(layer)
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    losses, grads = launch(rank_run, 2, (ir, plan_from(world=2, ep=2), 3, torch.float64))[0]
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= RTOL * abs(want), f"step {i}: loss {got} != {want}"
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert_close(grads[name], g, RTOL, f"gradient of {name}")
