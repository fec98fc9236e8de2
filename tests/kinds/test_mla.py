"""The mla kind's pure facets: the latent cache the memory model counts, its tp behaviour, FLOPs, scale, show."""

from __future__ import annotations

import math

import pytest

import ltmdsl
from ltmdsl.kinds.mla import dims, flops
from ltmdsl.memory import report
from ltmdsl.memory.symbols import T

V3 = ("mla(heads = 128, q_lora_rank = 1536, kv_lora_rank = 512, rope_scaling = yarn(factor = 40, "
      "original_context = 4096, beta_fast = 32, beta_slow = 1, mscale = 1, mscale_all_dim = 1))")


def model_of(layer: str, d_model: int = 7168, layers: int = 61):
    return ltmdsl.loads(f"model m {{\n vocab = 2\n d_model = {d_model}\n dtype = bf16\n layer x = {layer}\n"
                        f" stack {{ repeat {layers} {{ x }} }}\n}}\n").model


def test_deepseek_v3_cache_is_the_latent():
    """(512 + 64) bf16 values per token per layer: 61 * 576 * 2 = 70,272 bytes a token, against 4,997,120 for the
    same 128 heads caching keys (192) and values (128)."""
    m = model_of(V3)
    for context in (1, 4096, 131072):
        kv = report(m, None, context=context).components["kv_cache"]
        assert kv == 61 * (512 + 64) * 2 * context
    gqa = model_of("attention(heads = 128, head_dim = 192, v_head_dim = 128)")
    ratio = report(gqa, None, context=131072).components["kv_cache"] / report(m, None, context=131072).components[
        "kv_cache"]
    assert ratio == pytest.approx(61 * 128 * (192 + 128) * 2 / 70272)


def test_tensor_parallel_splits_heads_but_not_the_latent():
    m = model_of(V3, layers=2)
    one = report(m, None, context=8192).per_gpu_components["kv_cache"]
    tp8 = report(m, None, context=8192, gpus=8, tp=8).per_gpu_components["kv_cache"]
    assert tp8 == one, "every tensor-parallel rank holds the whole latent"
    # (tp must divide the heads: tests/golden_errors/mla_tp.ltm)


def test_flops_absorbed_decode_and_prefill():
    c = model_of(V3, layers=1).layers[0].mixer
    f = flops(c)["attention"]
    for context in (1, 100, 4096):
        assert f.per_token.subs(T, context) == 2 * 128 * (512 + 64 + 512) * context
        assert f.prefill.subs(T, context) == 2 * 128 * (192 + 128) * context * (context + 1) // 2


def test_softmax_scale_and_dims():
    c = model_of(V3, layers=1).layers[0].mixer
    mscale = 0.1 * 1 * math.log(40) + 1
    assert c.scale == pytest.approx(192 ** -0.5 * mscale**2, rel=1e-15)
    assert dims(c) == ("H=128 q_lora=1536 kv_lora=512 nope=128 rope=64 Dv=128 latent=576/token theta=10000 "
                       "yarnx40@4096")
    plain = model_of("mla(heads = 16)", d_model=2048, layers=1).layers[0].mixer
    assert plain.scale == 192 ** -0.5 and "q_lora=none" in dims(plain)
