"""MoE variants in the language: exact parameter counts, active parameters, expert-parallel weight bytes,
workspace and stored activations of the shared expert, `show` dims, and the IR fields they resolve to."""

from __future__ import annotations

import pytest
import ltmdsl
from ltmdsl.kinds.moe import KIND
from ltmdsl.memory import report

D = 64


def spec(layer: str, d: int = D, dense_first: int = 0) -> ltmdsl.ir.ModelIR:
    dense = "layer dense = mlp(d_ff = 96)\n" if dense_first else ""
    stack = f"repeat {dense_first} {{ dense }} " if dense_first else ""
    text = f"model m {{\n vocab = 16\n d_model = {d}\n {dense} layer x = {layer}\n stack {{ {stack}x }}\n}}\n"
    return ltmdsl.loads(text).model


def with_budget(layer: str, budget: str):
    """(model, budget IR) of a one-MoE model and one budget block written in the language."""
    text = (f"model m {{\n vocab = 16\n d_model = {D}\n layer x = {layer}\n stack {{ x }}\n}}\n"
            f"budget b for m {{\n {budget}\n}}\n")
    ir = ltmdsl.loads(text)
    return ir.model, ir.budgets[0]


def moe_params(layer: str, d: int = D) -> int:
    return spec(layer, d).layers[0].params - d  # minus the rmsnorm weight


@pytest.mark.parametrize("layer, expected", [
    ("moe(experts = 8, top_k = 2, d_ff = 16, shared_d_ff = 40)", 64 * 8 + 8 * 3 * 64 * 16 + 3 * 64 * 40),
    ("moe(experts = 8, top_k = 2, d_ff = 16, shared_d_ff = 40, shared_gate = true)",
     64 * 8 + 8 * 3 * 64 * 16 + 3 * 64 * 40 + 64),
    ("moe(experts = 8, top_k = 2, d_ff = 16, routing = sigmoid_topk_renorm, groups = 4, top_groups = 2, "
     "selection_bias = true, routed_scale = 2.5)", 64 * 8 + 8 * 3 * 64 * 16),
    ("moe(experts = 4, top_k = 2, d_ff = 16, act = swiglu_clamped, routing = topk_softmax, router_bias = true, "
     "expert_bias = true)", 64 * 4 + 4 + 4 * (3 * 64 * 16 + 2 * 16 + 64)),
    ("moe(experts = 4, top_k = 2, d_ff = 16, act = relu2, expert_bias = true, shared_d_ff = 24)",
     64 * 4 + 4 * (2 * 64 * 16 + 16 + 64) + 2 * 64 * 24),
    ("moe(experts = 4, top_k = 1, d_ff = 16, routing = sigmoid_topk, weight_input = true, shared_d_ff = 16)",
     64 * 4 + 4 * 3 * 64 * 16 + 3 * 64 * 16),
], ids=["shared", "shared-gate", "deepseek-v3-routing", "gpt-oss", "relu2-bias-shared", "llama4"])
def test_exact_counts(layer, expected):
    assert moe_params(layer) == expected


def test_active_parameters_keep_the_shared_expert_and_drop_unrouted_experts():
    m = spec("moe(experts = 8, top_k = 2, d_ff = 16, shared_d_ff = 40, shared_gate = true, expert_bias = true, "
             "router_bias = true)")
    expert = 3 * 64 * 16 + 2 * 16 + 64
    assert m.params_total - m.params_active == 6 * expert
    assert m.params_active == 16 * 64 * 2 + 64 + 64 + (64 * 8 + 8) + 2 * expert + 3 * 64 * 40 + 64


def test_expert_parallel_shards_routed_experts_only():
    """Weights per GPU: dense (embeddings, norms, router, shared expert) whole, routed experts / ep, to the byte."""
    layer = "moe(experts = 8, top_k = 2, d_ff = 16, shared_d_ff = 40, shared_gate = true)"
    experts = 8 * 3 * 64 * 16
    for ep in (1, 2, 8):
        m, b = with_budget(layer, f"inference context = 4096\n on {ep} x H100 with ep = {ep}")
        dense = m.params_total - experts
        assert report(m, b).per_gpu_components["weights"] == 2 * (dense + experts // ep), ep


def test_shared_expert_adds_workspace_and_stored_activations():
    plain, shared = "moe(experts = 8, top_k = 2, d_ff = 16)", "moe(experts = 8, top_k = 2, d_ff = 16, shared_d_ff = 40)"

    def act(layer, budget):
        return report(*with_budget(layer, budget)).per_gpu_components["activations"]

    inf = "inference context = 1024, chunk = 256\n on 1 x H100"
    # inference: the shared MLP's moment (the routed output, act(gate) and up in place; the routing weights
    # released with the routed part) outgrows the routed experts' once Fs is wide; the residual x and norm(x)
    # come on top (bf16, n = 256)
    wide = "moe(experts = 8, top_k = 2, d_ff = 16, shared_d_ff = 400)"
    assert act(wide, inf) == 2 * 256 * D * 2 + (2 * 256 * D + 2 * 256 * 2 * 400)
    assert act(shared, inf) >= act(plain, inf)
    train = "training context = 1024, batch = 1, recompute = selective\n on 1 x H100"
    # eager autograd (the default saved_by) keeps gate, up, act(gate) and the product: 4Fs
    assert act(shared, train) - act(plain, train) == 2 * 1024 * 4 * 40


def test_dense_first_layers_are_the_stack():
    """DeepSeek's first_k_dense_replace: dense MLP sub-layers before the MoE ones, counted as such."""
    m = spec("moe(experts = 8, top_k = 2, d_ff = 16, shared_d_ff = 16)", dense_first=3)
    assert [layer.kind for layer in m.layers] == ["mlp"] * 3 + ["moe"]
    assert m.params_total - m.params_active == 6 * 3 * 64 * 16


def test_ir_fields_and_dims():
    m = spec("moe(experts = 8, top_k = 2, d_ff = 16, routing = sigmoid_topk_renorm, groups = 4, top_groups = 2, "
             "selection_bias = true, routed_scale = 2.5, shared_d_ff = 16)")
    c = m.layers[0].mixer
    assert (c.groups, c.top_groups, c.group_score, c.selection_bias, c.routed_scale) == (4, 2, "top2_sum", True, 2.5)
    assert KIND.dims(c) == ("E=8 k=2 d_ff=16 swiglu sigmoid_topk_renorm groups=2/4 top2_sum selection_bias "
                            "scale=2.5 shared=16")
    j = m.to_json()["layers"][0]["mixer"]
    assert j["shared_d_ff"] == 16 and j["routing"] == "sigmoid_topk_renorm"
    g = spec("moe(experts = 4, d_ff = 16, act = swiglu_clamped)").layers[0].mixer
    assert (g.swiglu_limit, g.swiglu_alpha) == (7.0, 1.702)


def test_variants_name_the_settings_beyond_a_plain_moe():
    assert spec("moe(experts = 4, d_ff = 16, routing = softmax_topk)").layers[0].mixer.variants() == ()
    c = spec("moe(experts = 8, d_ff = 16, groups = 2, shared_d_ff = 8, act = relu2)").layers[0].mixer
    assert c.variants() == ("groups", "top_groups", "shared_d_ff")
    g = spec("moe(experts = 4, d_ff = 16, act = swiglu_clamped)").layers[0].mixer
    assert g.variants() == ()  # the activation is a plain field; its default constants are not variants
