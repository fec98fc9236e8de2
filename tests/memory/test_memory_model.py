"""Contracts and behaviour of the memory model on hand-built IR: exactness, solving, parallelism."""

from __future__ import annotations

import json

import pytest
from memory_zoo import budget, custom_gpu, limit
from test_memory_fold import MODEL as MOE

from ltmdsl.ir import ParallelPlan, SpecIR
from ltmdsl.memory import cache_bytes, check_budgets, report, weights_bytes
from ltmdsl.memory.plot import sweep_contexts
from ltmdsl.memory.solve import largest_true
from ltmdsl.units import DTYPES

BF16, FP8, FP32 = DTYPES["bf16"], DTYPES["fp8_e4m3"], DTYPES["fp32"]
JSON_KEYS = {"mode", "context", "batch", "components", "total_bytes", "per_gpu_bytes", "gpus_needed", "gpu",
             "max_context", "formulas"}


@pytest.mark.parametrize("name", ["llama-3.1-8b", "mistral-7b-v0.1", "jamba-v0.1", "mamba-2.8b", "mamba2-2.7b"])
@pytest.mark.parametrize("T", [1, 63, 4097, 10**6], ids=lambda t: f"T{t}")
def test_cache_bytes_follows_the_contract_formula(models, name, T):
    m = models[name]
    kv = state = 0
    for layer in m.layers:
        x = layer.mixer
        if x.kind == "attention":
            kv += 3 * x.kv_heads * (x.head_dim + x.v_head_dim) * min(T, x.window or T) * 1
        elif x.kind == "mamba":
            state += 3 * x.d_inner * x.d_conv * 4 + 3 * x.d_inner * x.d_state * 4
        elif x.kind == "mamba2":
            state += 3 * x.conv_dim * x.d_conv * 4 + 3 * x.heads * x.head_dim * x.d_state * 4
    got = cache_bytes(m, batch=3, context=T, kv_dtype=FP8, state_dtype=FP32)
    assert got == {"kv_cache": kv, "recurrent_state": state}


def test_weights_bytes(models):
    m = models["mixtral-8x7b"]
    assert weights_bytes(m, BF16) == 2 * 46_702_792_704
    assert weights_bytes(m, "fp8") == 46_702_792_704


def test_fp8_kv_from_the_budget_halves_the_cache(models):
    m = models["llama-3.1-8b"]
    bf16 = report(m, budget(context=65536)).components["kv_cache"]
    fp8 = report(m, budget(context=65536, kv_dtype=FP8)).components["kv_cache"]
    assert 2 * fp8 == bf16


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_json_has_the_documented_keys_and_exact_ints(models, mode):
    r = report(models["jamba-v0.1"], None, mode=mode, context=65536)
    data = json.loads(json.dumps(r.to_json()))
    assert JSON_KEYS <= set(data)
    assert data["gpu"] == {"name": "H100", "memory_bytes": 80 * 10**9}
    assert all(isinstance(v, int) for v in data["components"].values())
    assert data["total_bytes"] == sum(data["components"].values())
    assert set(data["formulas"]) == set(data["components"])


@pytest.mark.parametrize("name, comp, order", [
    ("llama-3.1-8b", "kv_cache", "O(T)"), ("mistral-7b-v0.1", "kv_cache", "O(1)"),
    ("mamba-2.8b", "recurrent_state", "O(1)"), ("llama-3.1-8b", "weights", "O(1)"),
])
def test_growth_orders_inference(models, name, comp, order):
    assert report(models[name], None).growth[comp] == order


def test_eager_attention_training_activations_are_quadratic(models):
    r = report(models["llama-3.1-8b"], None, mode="training", recompute="none", flash_attention=False)
    assert r.growth["activations"] == "O(T^2)"
    flash = report(models["llama-3.1-8b"], None, mode="training", recompute="none")
    assert flash.growth["activations"] == "O(T)"


def test_max_context_is_exact_on_the_integer_formula(models):
    m = models["llama-3.1-8b"]
    b = budget(context=10**6, limits=[limit("total", 60 * 10**9)])
    r = report(m, b)
    ev = r.evaluator
    assert r.max_context is not None
    assert ev.fits(r.max_context, 1, b.limits)
    assert not ev.fits(r.max_context + 1, 1, b.limits)


def test_max_batch_is_exact(models):
    r = report(models["llama-3.1-8b"], budget(context=32768))
    assert r.evaluator.fits(32768, r.max_batch) and not r.evaluator.fits(32768, r.max_batch + 1)


def test_largest_true_edges():
    assert largest_true(lambda n: n <= 1000) == 1000
    assert largest_true(lambda n: False) == 0
    assert largest_true(lambda n: True, cap=2**20) is None


def test_tensor_and_context_parallel_split_the_kv_cache(models):
    m = models["llama-3.1-8b"]
    one = report(m, budget(context=2**20)).per_gpu_components["kv_cache"]
    split = report(m, budget(context=2**20, gpus=16, parallel=ParallelPlan(tp=8, cp=2))).per_gpu_components
    assert split["kv_cache"] * 16 == one
    rep = report(m, budget(context=2**20, gpus=16, parallel=ParallelPlan(tp=16)))
    assert rep.per_gpu_components["kv_cache"] * 8 == one  # 8 KV heads: replicated beyond tp = 8


def test_pipeline_first_stage_holds_l_layers_worth(models):
    m = models["llama-3.1-8b"]
    # layers only: under saved_by = "eager" the last stage also keeps the final norm's activations
    kw = dict(mode="training", context=4096, batch=8, saved_by="fused")
    flat = report(m, None, gpus=1, tp=1, **kw)
    piped = report(m, None, gpus=4, pp=4, microbatches=8, **kw)
    assert piped.most_loaded_stage == 0
    stage0 = piped.evaluator.plan.values(4096, 8, 4096)[0]["activations"]
    per_mb = flat.evaluator.plan.values(4096, 1, 4096)[0]["activations"]
    assert stage0 == per_mb  # p micro-batches of L/p layers = L layers of one micro-batch
    inter = report(m, None, gpus=4, pp=4, microbatches=8, interleave=2, **kw)
    assert inter.evaluator.plan.values(4096, 8, 4096)[0]["activations"] == per_mb * (1 + 3 / 32)


def test_chunked_loss_bounds_the_logits_and_is_advised(models):
    m = models["llama-3.1-8b"]
    kw = dict(mode="training", context=2**20, batch=1, gpus=8, tp=8)
    plain = report(m, None, **kw)
    assert plain.components["logits"] == 4 * 2**20 * 128256
    assert any("chunked loss" in n for n in plain.notes)
    chunked = report(m, None, chunked_loss=True, chunk=4096, **kw)
    assert chunked.components["logits"] == 4 * 4096 * 128256


def test_tp_rank_counts_the_vocab_parallel_loss_gradients_and_its_chunk_working_set(models):
    """Under tp the loss is vocab-parallel on V/t head rows: it keeps d loss / d hidden (a*s*d) and d loss /
    d rows (fp32, d*V/t), no logits; its fp32 [c, V/t] softmax (3 such buffers) is a temporary, c bounded by the
    chunk. Exact sympy arithmetic, so the tolerance is 0."""
    m, t, s, d, v = models["llama-3.1-8b"], 8, 2**20, 4096, 128256
    kw = dict(mode="training", context=s, batch=1, gpus=8, tp=t)
    plain = report(m, None, **kw)
    assert plain.per_gpu_components["logits"] == 2 * s * d + 4 * d * v // t
    assert plain.per_gpu_components["temporaries"] == 3 * 4 * s * v // t
    assert any("chunked loss" in n for n in plain.notes)  # 192 GiB of [s, V/t] softmax buffers
    chunked = report(m, None, chunked_loss=True, chunk=4096, **kw)
    assert chunked.per_gpu_components["logits"] == plain.per_gpu_components["logits"]
    # chunked, the largest transient is the final norm's backward, (16 + a)*s*d on every tp rank (its norm sees the
    # whole width), less what the loss kept and freed before it (d loss / d hidden and d loss / d rows)
    final_norm = 18 * s * d - (2 * s * d + 4 * d * v // t)
    assert chunked.per_gpu_components["temporaries"] == max(3 * 4 * 4096 * v // t, 2 * s * d + 6 * d * v // t,
                                                            final_norm) == final_norm


def test_zero3_gpu_count_under_the_plan(models):
    r = report(models["llama-3.1-8b"], None, mode="training", context=4096, batch=64, gpus=8, dp=8, zero=3,
               recompute="full")
    # 9, not 8: 8 sequences of 4096 tokens per GPU with an unchunked loss hold 16.8 GB of fp32 logits, and the
    # loss's backward adds their two fp32 gradients (33.6 GB of temporaries, less the full-recompute working set,
    # which is not yet recomputed while the loss back-propagates; 10 GPUs when it was counted as live)
    assert r.gpus_needed_plan == 9
    p = r.evaluator
    dp = r.gpus_needed_plan
    assert p.per_gpu_bytes(4096, 64, dp) <= 80 * 10**9
    if dp > 1:
        assert p.per_gpu_bytes(4096, 64, dp - 1) > 80 * 10**9


def test_expert_parallel_shards_expert_weights(models):
    m = models["mixtral-8x7b"]
    one = report(m, budget(gpus=8, parallel=ParallelPlan(dp=8))).per_gpu_components["weights"]
    ep = report(m, budget(gpus=8, parallel=ParallelPlan(dp=8, ep=8))).per_gpu_components["weights"]
    assert ep < one / 4


def test_user_defined_gpu_and_limits_in_check_budgets(models):
    m = models["llama-3.1-8b"]
    gpu = custom_gpu("Tiny24", 24 * 10**9)
    ok = budget("small", m.name, context=4096, gpu=gpu)
    bad = budget("big", m.name, context=10**6, gpu=gpu, limits=[limit("kv_cache", 10**9, line=12)])
    results = check_budgets(SpecIR((m,), (ok, bad), (gpu,), "test.ltm"))
    assert [r.ok for r in results] == [True, False]
    kv = results[1].failures[0]
    assert kv.component == "kv_cache" and kv.pos.line == 12
    assert kv.over_by == 131072 * 10**6 - 10**9
    assert kv.max_context == 10**9 // 131072
    assert "test.ltm:12:5" in results[1].message and "kv_cache" in results[1].message
    assert "largest context" in results[1].message
    assert results[1].failures[-1].component.startswith("per_gpu")  # 24 GB cannot hold 131 GB of KV
    assert json.dumps(results[1].to_json())


def test_flops_hybrid_vs_dense(models):
    dense = report(models["llama-3.1-8b"], None, context=10**6).flops
    hybrid = report(models["jamba-v0.1"], None, context=10**6).flops
    mamba = report(models["mamba-2.8b"], None, context=10**6).flops
    assert dense["per_token"]["attention"] == 32 * 2 * 32 * 256 * 10**6
    assert dense["prefill"]["attention"] == 32 * 2 * 32 * 256 * (10**6 * (10**6 + 1) // 2)
    assert mamba["per_token"]["attention"] == 0
    assert hybrid["per_token"]["attention"] * 8 == 4 * 2 * 32 * 256 * 10**6 * 8
    assert report(models["mamba-2.8b"], None, context=10).flops["per_token"] == mamba["per_token"]


def test_window_prefill_flops_piecewise(models):
    m = models["mistral-7b-v0.1"]
    w = 4096
    for T in (100, 4096, 5000):
        f = report(m, None, context=T).flops["prefill"]["attention"]
        causal = sum(min(i, w) for i in range(1, T + 1))
        assert f == 32 * 2 * 32 * 256 * causal


def test_sweep_and_contexts(models):
    cs = sweep_contexts()
    assert cs[0] == 1000 and cs[-1] == 10**9 and len(cs) == 100
    r = report(models["llama-3.1-8b"], None)
    data = r.sweep(cs)
    assert data["kv_cache"] == [131072 * t for t in cs]


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "serve"}, "mode"), ({"recompute": "some"}, "recompute"), ({"gpu": "H900"}, "unknown GPU"),
    ({"kv_dtype": "fp4"}, "unknown dtype"), ({"tpp": 2}, "unknown setting"), ({"context": 0}, "positive"),
], ids=["mode", "recompute", "gpu", "dtype", "setting", "context"])
def test_bad_overrides_raise_value_error(models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        report(models["llama-3.1-8b"], None, **kwargs)


def test_thousand_layers_builds_once_per_configuration(models):
    import time

    from memory_zoo import attention, mamba2, mlp, model

    d = 2048
    layers = [mamba2(d), mlp(d, 8192), attention(d, 16, 4, window=4096), mlp(d, 8192)] * 250
    m = model("deep", 65536, d, layers)
    t = time.perf_counter()
    r = report(m, None, context=10**8)
    r.sweep(sweep_contexts())
    assert time.perf_counter() - t < 1.0
    assert r.components["kv_cache"] == 250 * 4 * 256 * 4096 * 2


@pytest.mark.parametrize("recompute, extra", [("none", 0), ("selective", "attention"), ("full", "all")])
def test_training_step_flops(models, recompute, extra):
    f = report(models["llama-3.1-8b"], None, context=4096, mode="training", recompute=recompute).flops
    pre = f["prefill"]
    added = {0: 0, "attention": pre["attention"], "all": f["prefill_total"]}[extra]
    assert f["training_step_total"] == 3 * f["prefill_total"] + added


RUNTIME_PLAN = MOE + """budget refused for moe {
    training context = 256, batch = 8
    on 4 x H100 with cp = 4, ep = 2, interleave = 2
}
budget runs for moe {
    training context = 256, batch = 8
    on 4 x H100 with ep = 2, zero = 1
}
"""


def test_a_training_plan_the_runtime_refuses_is_said_in_the_report():
    """The memory model answers for plans ltmdsl.distributed does not run; the report says so (its plan check's
    own message), so the user learns it when planning rather than at `ltmdsl train --budget`."""
    import ltmdsl
    from ltmdsl.memory import report

    spec = ltmdsl.loads(RUNTIME_PLAN)
    refused, runs = (report(spec.model, b) for b in spec.budgets)
    assert any("ltmdsl.distributed does not run this plan" in n and "interleave = 2 needs a pipeline (pp > 1)" in n
               for n in refused.notes), refused.notes
    assert not any("does not run" in n for n in runs.notes)
