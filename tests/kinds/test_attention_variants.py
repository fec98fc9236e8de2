"""Attention variants and RoPE scalings in the language: parsed values, exact counts, cache bytes and FLOPs."""

from __future__ import annotations

import pytest

import ltmdsl
from ltmdsl.ir import RopeScaling
from ltmdsl.kinds.attention import dims, flops, rope_attention_factor
from ltmdsl.memory import cache_bytes
from ltmdsl.memory.symbols import T
from ltmdsl.units import DTYPES


def layer_of(text: str, d_model: int = 64):
    spec = ltmdsl.loads(f"model m {{\n vocab = 2\n d_model = {d_model}\n layer x = {text}\n stack {{ x }}\n}}\n")
    return spec.model, spec.model.layers[0]


def test_yarn_and_linear_parse_to_their_scalings():
    _, layer = layer_of("attention(heads = 4, rope_scaling = yarn(factor = 40, original_context = 4Ki, "
                        "beta_fast = 32, beta_slow = 1, mscale = 1, mscale_all_dim = 1))")
    assert layer.mixer.rope_scaling == RopeScaling("yarn", 40.0, original_context=4096, beta_fast=32.0,
                                                   beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    assert "yarnx40@4096" in dims(layer.mixer)
    _, layer = layer_of("attention(heads = 4, rope_scaling = linear(factor = 8))")
    assert layer.mixer.rope_scaling == RopeScaling("linear", 8.0)
    assert dims(layer.mixer).endswith("rope=10000 linearx8")


def test_longrope_parses_with_its_factor_lists():
    _, layer = layer_of("attention(heads = 4, head_dim = 8, rope_scaling = longrope(factor = 32, "
                        "original_context = 4Ki, short_factor = factors(1, 1, 1.5, 2), "
                        "long_factor = factors(1, 2, 4, 8)))")
    assert layer.mixer.rope_scaling == RopeScaling("longrope", 32.0, original_context=4096,
                                                   short_factor=(1.0, 1.0, 1.5, 2.0), long_factor=(1.0, 2.0, 4.0, 8.0))
    assert rope_attention_factor(layer.mixer.rope_scaling) == (1 + 3.4657359027997265 / 8.317766166719343) ** 0.5


@pytest.mark.parametrize("scaling, factor", [
    (RopeScaling("yarn", 40.0, original_context=4096, mscale=1.0, mscale_all_dim=1.0), 1.0),  # DeepSeek-V3
    (RopeScaling("yarn", 32.0, original_context=4096), 0.1 * 3.4657359027997265 + 1),  # gpt-oss: 1 + 0.1 ln 32
    (RopeScaling("yarn", 4.0, original_context=4096, attention_factor=1.5), 1.5),
    (RopeScaling("yarn", 1.0, original_context=4096), 1.0),
    (RopeScaling("linear", 8.0), 1.0),
    (None, 1.0),
], ids=["deepseek-mscale", "default", "explicit", "factor-1", "linear", "none"])
def test_rope_attention_factor(scaling, factor):
    assert rope_attention_factor(scaling) == pytest.approx(factor, rel=1e-15)


def one(text: str, d_model: int = 64) -> int:
    return layer_of(text, d_model)[1].params - d_model  # minus the rmsnorm weight


@pytest.mark.parametrize("text, d, expected", [
    ("attention(heads = 4, kv_heads = 2, gate = true)", 64, 2 * 64 * 64 + 2 * 64 * 32 + 64 * 64),
    ("attention(heads = 4, kv_heads = 2, gate = true, qkv_bias = true)", 64,
     2 * 64 * 64 + 128 + 2 * (64 * 32 + 32) + 64 * 64),
    ("attention(heads = 4, kv_heads = 2, sinks = true)", 64, 64 * 64 + 2 * 64 * 32 + 64 * 64 + 4),
    ("attention(heads = 4, kv_heads = 2, softcap = 50, qk_l2_norm = true, chunk = 8)", 64,
     64 * 64 + 2 * 64 * 32 + 64 * 64),
    # Qwen3-Next-80B-A3B's attention: d 2048, 16 heads of 256, 2 KV heads, gate, qk-norm:
    # q 2048 * 8192 + k, v 2 * 2048 * 512 + o 4096 * 2048 + norms 2 * 256 (transformers' Qwen3NextAttention)
    ("attention(heads = 16, kv_heads = 2, head_dim = 256, gate = true, qk_norm = true)", 2048,
     2048 * 8192 + 2 * 2048 * 512 + 4096 * 2048 + 512),
    # gpt-oss-20b's attention: d 2880, 64 heads of 64, 8 KV heads, biases, sinks
    ("attention(heads = 64, kv_heads = 8, head_dim = 64, qkv_bias = true, out_bias = true, sinks = true)", 2880,
     2880 * 4096 + 4096 + 2 * (2880 * 512 + 512) + 4096 * 2880 + 2880 + 64),
], ids=["gate", "gate-bias", "sinks", "no-params", "qwen3-next", "gpt-oss-20b"])
def test_variant_parameter_counts(text, d, expected):
    assert one(text, d) == expected


def test_chunked_cache_and_flops():
    """A chunk C holds min(T, C) tokens; prefill FLOPs sum the causal keys within each chunk, decode those of the
    newest query's chunk."""
    m, layer = layer_of("attention(heads = 4, kv_heads = 2, chunk = 8)")
    c = layer.mixer
    for context in (1, 5, 8, 9, 100):
        got = cache_bytes(m, batch=3, context=context, kv_dtype=DTYPES["bf16"], state_dtype=DTYPES["fp32"])
        assert got["kv_cache"] == 3 * 2 * (16 + 16) * min(context, 8) * 2
    f = flops(c)["attention"]
    width = 2 * 4 * (16 + 16)
    for context in (1, 7, 8, 9, 17, 100):
        keys = sum(i % 8 + 1 for i in range(context))  # query i sees the keys of its chunk up to itself
        assert f.prefill.subs(T, context) == width * keys
        assert f.per_token.subs(T, context) == width * ((context - 1) % 8 + 1)
    assert "chunk=8" in dims(c)


def test_variants_in_dims():
    _, layer = layer_of("attention(heads = 4, gate = true, sinks = true, softcap = 30, qk_l2_norm = true)")
    assert dims(layer.mixer).endswith("gate sinks softcap=30 qk_l2")


def test_query_pre_attn_scalar_sets_the_softmax_scale():
    """Gemma-3-27B: head_dim 128, query_pre_attn_scalar 168: scale 168^-1/2; without it head_dim^-1/2."""
    _, layer = layer_of("attention(heads = 32, kv_heads = 16, head_dim = 128, query_pre_attn_scalar = 168)", 5376)
    assert layer.mixer.score_scale == 168 ** -0.5 and "scale=1/sqrt(168)" in dims(layer.mixer)
    _, plain = layer_of("attention(heads = 32, kv_heads = 16, head_dim = 128)", 5376)
    assert plain.mixer.score_scale == 128 ** -0.5 and plain.params == layer.params


def test_gemma3_local_global_is_two_definitions():
    """Per-layer RoPE bases and scalings: Gemma-3's 5 local (window 1024, theta 1e4) : 1 global (theta 1e6,
    linear 8x) layers as two definitions in a pattern."""
    spec = ltmdsl.loads("""model m {
    vocab = 2
    d_model = 64
    layer local = attention(heads = 4, kv_heads = 2, window = 1024, rope_theta = 10000)
    layer global = attention(heads = 4, kv_heads = 2, rope_theta = 1e6, rope_scaling = linear(factor = 8))
    layer ffn = mlp(d_ff = 128)
    legend { L = local, G = global, F = ffn }
    stack { pattern "LFLFLFLFLFGF" }
}
""")
    mixers = [x.mixer for x in spec.model.layers if x.mixer.kind == "attention"]
    assert [x.rope_theta for x in mixers] == [1e4] * 5 + [1e6]
    assert [x.rope_scaling for x in mixers] == [None] * 5 + [RopeScaling("linear", 8.0)]
    assert [x.window for x in mixers] == [1024] * 5 + [None]
