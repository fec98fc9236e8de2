"""Published figures the memory model must reproduce exactly (the Jamba paper's KV
caches at 256K tokens, Magic.dev's 100M-token post, Korthikanti et al. 2022, the ZeRO paper)."""

from __future__ import annotations

import pytest
import sympy

from ltmdsl.ir import ParallelPlan
from ltmdsl.memory import cache_bytes, report
from ltmdsl.memory.activations import korthikanti_per_layer
from ltmdsl.memory.settings import resolve
from ltmdsl.memory.symbols import compile_exact
from ltmdsl.memory.training import model_states
from ltmdsl.units import DTYPES

GiB = 2**30
MiB = 2**20
BF16 = DTYPES["bf16"]


def test_llama_405b_kv_per_token_and_at_100m(models):
    m = models["llama-3.1-405b"]
    per_token = cache_bytes(m, batch=1, context=1, kv_dtype=BF16, state_dtype=BF16)["kv_cache"]
    assert per_token == 516_096
    r = report(m, None, context=10**8)
    assert r.components["kv_cache"] == 51_609_600_000_000
    assert isinstance(r.components["kv_cache"], int)


def test_llama_405b_gpu_count_matches_magic_dev_under_80e9_convention(models):
    r = report(models["llama-3.1-405b"], None, context=10**8)
    assert r.settings.gpu.memory_bytes == 80 * 10**9
    assert r.gpus_needed_by_component["kv_cache"] == 646  # "about 640" (638 at 81 GB)
    # with the 811.7 GB of bf16 weights on top, and a decode step's scores over one layer's slots (a + 8 bytes
    # for each of 128 heads: 128 GB at 100M tokens; one sequence's einsum reads the cached keys without a copy)
    assert r.gpus_needed == 657


@pytest.mark.parametrize("name, gib", [
    ("llama-2-7b", 128), ("mixtral-8x7b", 32), ("jamba-v0.1", 4),
], ids=["llama-2-7b", "mixtral", "jamba"])
def test_jamba_paper_kv_table_at_256k(models, name, gib):
    r = report(models[name], None, context=262_144)
    assert r.components["kv_cache"] == gib * GiB


def test_mistral_window_caps_the_cache(models):
    m = models["mistral-7b-v0.1"]
    r = report(m, None, context=262_144)
    assert r.components["kv_cache"] == 512 * MiB
    assert r.growth["kv_cache"] == "O(1)"
    assert report(m, None, context=2048).components["kv_cache"] == 256 * MiB  # min(T, W) below W


def test_mamba2_has_no_kv_and_constant_state(models):
    m = models["mamba2-2.7b"]
    small, big = report(m, None, context=1024), report(m, None, context=10**8)
    assert small.components["kv_cache"] == big.components["kv_cache"] == 0
    assert small.components["recurrent_state"] == big.components["recurrent_state"] > 0
    assert big.growth["recurrent_state"] == "O(1)"
    assert big.max_context is None  # fits at any context


def test_mamba_2_8b_state_sizes(models):
    m = models["mamba-2.8b"]
    r = report(m, None, context=4096, conv_taps="minus_one")
    assert r.by_kind["recurrent_state"]["mamba/ssm"] == 10_485_760
    assert r.by_kind["recurrent_state"]["mamba/conv"] == 1_966_080
    full = report(m, None, context=4096).by_kind["recurrent_state"]["mamba/conv"]
    assert full == 1_966_080 * 4 // 3


# Korthikanti et al. 2022, Figure 1: 22B, h 6144, a 64, L 48, t 8, b 4, s 2048 ("paper" convention: dropout
# masks, and the fused kernels the paper assumes, whose norms keep only their input: saved_by = "fused").
PAPER = dict(mode="training", context=2048, batch=4, tp=8, gpus=8, dropout=True, flash_attention=False,
             activation_dtype="fp16", weight_dtype="fp16", saved_by="fused")


@pytest.mark.parametrize("sp, recompute, gib", [
    (False, "none", 59.25), (True, "selective", 9.5625), (True, "none", 39.5625), (False, "selective", 29.25),
], ids=["tp-none", "tp-sp-selective", "tp-sp-none", "tp-selective"])
def test_korthikanti_figure1_activations(models, sp, recompute, gib):
    r = report(models["gpt-22b"], None, sequence_parallel=sp, recompute=recompute, **PAPER)
    assert r.per_gpu_components["activations"] == gib * GiB


@pytest.mark.parametrize("t", [1, 2, 8])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
@pytest.mark.parametrize("selective", [False, True], ids=["none", "selective"])
def test_stored_matches_the_closed_forms(models, t, sp, selective):
    m = models["gpt-22b"]
    r = report(m, None, sequence_parallel=sp, recompute="selective" if selective else "none",
               **{**PAPER, "tp": t, "gpus": t})
    expected = 48 * korthikanti_per_layer(2048, 4, 6144, 64, t=t, sp=sp, selective=selective)
    assert r.per_gpu_components["activations"] == expected


def test_korthikanti_figure1_model_states(models):
    """18 B/param x 12*L*h^2/(t*p) = 45.5625 GiB for the paper's matrices (the zoo's IR counts 12h^2 per layer
    as the paper does); per tp rank the memory model also holds what tp replicates whole: each layer's two
    layernorms (2h each) and the row-parallel o_proj and down_proj biases (h each), 6h of the 12h^2."""
    r = report(models["gpt-22b"], None, **PAPER)
    layers = sum(r.evaluator.plan.values(2048, 4, 4096)[0][c] for c in ("weights", "gradients", "optimizer"))
    by_kind = 0
    for comp in ("weights", "gradients", "optimizer"):
        stage = r.evaluator.plan_stages[0].by_kind[comp]
        by_kind += sum(compile_exact(stage[k])(2048, 4, 4096) for k in ("attention", "mlp"))
    L, h, t = 48, 6144, 8
    assert by_kind == int(45.5625 * GiB) + 18 * L * 6 * h * sympy.Rational(t - 1, t)
    assert layers > by_kind  # embeddings and head come on top


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)],
                         ids=["zero0", "zero1", "zero2", "zero3"])
def test_zero_paper_figure1(models, stage, gb):
    s = resolve(models["llama-3.1-8b"], None, mode="training", dp=64, gpus=64, zero=stage,
                grad_dtype="fp16", weight_dtype="fp16")
    states = model_states(7_500_000_000, 0, s)
    assert round(float(sum(states.values())) / 1e9, 1) == gb


def test_megatron_conventions_16_18_20(models):
    m = models["llama-3.1-8b"]
    P = m.params_total
    for grad, opt, per_param in (("fp16", 12, 16), ("fp32", 12, 18), ("fp16", 16, 20)):
        r = report(m, None, mode="training", context=1024, grad_dtype=grad, optimizer_bytes_per_param=opt)
        assert sum(r.components[c] for c in ("weights", "gradients", "optimizer")) == per_param * P
    r = report(m, None, mode="training", context=1024, dp=8, gpus=8, distributed_optimizer=True,
               parallel=ParallelPlan())
    # 6 + 12/dp bytes per parameter (bf16 weights, fp32 gradients)
    assert sum(r.per_gpu_components[c] for c in ("weights", "gradients", "optimizer")) == 6 * P + 12 * P // 8
