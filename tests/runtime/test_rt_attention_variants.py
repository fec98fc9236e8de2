"""Attention variants and RoPE scalings against transformers' own modules in float64 and a float64 token loop.

transformers (fp64, eager), HF_TOL = 1e-6: linear and yarn RoPE through LlamaAttention + LlamaRotaryEmbedding,
attention sinks with yarn RoPE through GptOssAttention (gpt-oss: biases, truncate = false), the logit soft cap
through Gemma2Attention, the gated output with qk-norm and partial RoPE through Qwen3NextAttention; each also
through our KV cache (prefill + chunk + one-token decode). The frequencies and attention factors equal
transformers' rope init functions (modeling_rope_utils) bit for bit in fp32 at DeepSeek-V3's, gpt-oss's and
Qwen's published settings; dynamic NTK also against LlamaAttention generating with a DynamicCache; Gemma-3's
local and global layers (qk-norm, query_pre_attn_scalar, linear RoPE) against Gemma3Attention. The L2 qk-norm
and chunked attention (no transformers module runs them as a layer alone) are checked against `token_loop`, a
float64 per-query loop written here, to 1e-12. A whole model of variants decodes as it prefills (1e-10) and
allocates the memory model's cache bytes; bf16 (1e-2) and fp16 (5e-3) against fp32; gradcheck for training.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import assert_close, rel_err
from rt_irs import attention
from test_rt_layers import D_MODEL, EPS, HF_TOL, additive_mask, hidden, ours, perturb

from ltmdsl.ir import RopeScaling
from ltmdsl.kinds.attention import count, rope_attention_factor
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds.attention import Attention, KVCache
from ltmdsl.runtime.ops_attention import apply_rope, rope_cos_sin, rope_inv_freq

transformers = pytest.importorskip("transformers")
F64 = torch.float64
KERNELS = pytest.mark.parametrize("kernels", [TORCH_KERNELS, REFERENCE_KERNELS], ids=["sdpa", "reference"])

#: Published settings: DeepSeek-V3 (rope dims 64, theta 1e4, yarn 40x of 4096, mscale 1 / 1), gpt-oss (head 64,
#: theta 150000, yarn 32x of 4096, truncate false), Qwen3 long context (head 128, theta 1e6, yarn 4x of 32768),
#: DeepSeek-V2 style mscale 0.707 / 0.707 and a toy with an explicit attention factor, Gemma-3 linear 8x, Llama-4
#: Scout's llama3 16x of 8192 with equal low and high frequency factors (a step: no band to interpolate).
PUBLISHED = [
    (64, 10000.0, RopeScaling("yarn", 40.0, original_context=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                              mscale_all_dim=1.0)),
    (64, 150000.0, RopeScaling("yarn", 32.0, original_context=4096, beta_fast=32.0, beta_slow=1.0, truncate=False)),
    (128, 1e6, RopeScaling("yarn", 4.0, original_context=32768)),
    (64, 10000.0, RopeScaling("yarn", 40.0, original_context=4096, mscale=0.707, mscale_all_dim=0.707)),
    (16, 100.0, RopeScaling("yarn", 8.0, original_context=16, beta_fast=8.0, beta_slow=0.5, attention_factor=1.3)),
    (128, 1e6, RopeScaling("linear", 8.0)),
    (128, 5e5, RopeScaling("llama3", 16.0, 1.0, 1.0, 8192)),
]

DYNAMIC = RopeScaling("dynamic", 2.0, original_context=16)
#: LongRoPE at toy size (Phi-3's form: head_dim 16, 8 factors per list, 4x of 16 tokens)
LONGROPE = RopeScaling("longrope", 4.0, original_context=16,
                       short_factor=(1.0, 1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.5),
                       long_factor=(1.0, 1.2, 1.9, 3.0, 4.5, 6.0, 9.0, 12.0))


def hf_max_positions(s: RopeScaling) -> int:
    """transformers' max_position_embeddings: dynamic reads the original context from it; longrope its factor."""
    return s.original_context if s.kind == "dynamic" else int(s.factor * s.original_context)


def rope_parameters(theta: float, s: RopeScaling | None) -> dict:
    """transformers 5's rope_parameters dict for our scaling."""
    if s is None:
        return dict(rope_type="default", rope_theta=theta)
    out = dict(rope_type=s.kind, rope_theta=theta, factor=s.factor)
    if s.kind == "dynamic":  # transformers reads the original context from max_position_embeddings
        return out
    if s.kind == "longrope":
        out.update(original_max_position_embeddings=s.original_context, short_factor=list(s.short_factor),
                   long_factor=list(s.long_factor))
        if s.attention_factor is not None:
            out["attention_factor"] = s.attention_factor
        return out
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_context)
    if s.kind == "yarn":
        out["original_max_position_embeddings"] = s.original_context
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
            if getattr(s, key) is not None:
                out[key] = getattr(s, key)
    return out


@pytest.mark.parametrize("dim, theta, scaling", PUBLISHED,
                         ids=["deepseek-v3-yarn", "gpt-oss-yarn", "qwen-yarn", "mscale-0.707", "toy-attn-factor",
                              "gemma3-linear", "llama4-llama3-step"])
def test_rope_frequencies_equal_transformers_init_functions(dim, theta, scaling):
    """inv_freq bitwise in fp32 and the attention factor exactly, against ROPE_INIT_FUNCTIONS."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hc = LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, head_dim=dim, num_hidden_layers=1, vocab_size=16,
                     max_position_embeddings=int(scaling.factor * (scaling.original_context or 4096)),
                     rope_parameters=rope_parameters(theta, scaling))
    want, factor = ROPE_INIT_FUNCTIONS[scaling.kind](hc)
    got = rope_inv_freq(dim, theta, scaling, torch.float32)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3e}"
    assert rope_attention_factor(scaling) == factor
    plain = rope_inv_freq(dim, theta, None, torch.float32)
    assert not torch.equal(got, plain), "the scaling must change the frequencies"


@pytest.mark.parametrize("scaling", [DYNAMIC, LONGROPE, replace(LONGROPE, attention_factor=1.25)],
                         ids=["dynamic", "longrope", "longrope-attention-factor"])
@pytest.mark.parametrize("seq_len", [1, 16, 17, 40, 5000])
def test_length_dependent_frequencies_equal_transformers(scaling, seq_len):
    """Dynamic NTK's and LongRoPE's frequencies for a call reaching seq_len tokens, bitwise in fp32, against
    ROPE_INIT_FUNCTIONS with seq_len as the rotary embedding passes it (a tensor); the attention factors equal."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hc = LlamaConfig(hidden_size=32, num_attention_heads=2, head_dim=16, num_hidden_layers=1, vocab_size=16,
                     max_position_embeddings=hf_max_positions(scaling), rope_parameters=rope_parameters(100.0, scaling))
    want, factor = ROPE_INIT_FUNCTIONS[scaling.kind](hc, seq_len=torch.tensor(seq_len))
    got = rope_inv_freq(16, 100.0, scaling, torch.float32, seq_len=seq_len)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3e}"
    assert rope_attention_factor(scaling) == factor
    plain = rope_inv_freq(16, 100.0, None, torch.float32)
    if scaling.kind == "dynamic":
        assert torch.equal(got, plain) == (seq_len <= scaling.original_context)
    else:
        short = rope_inv_freq(16, 100.0, scaling, torch.float32)
        assert torch.equal(got, short) == (seq_len <= scaling.original_context)


def causal_mask(Tq, Tk):
    """Additive [1, 1, Tq, Tk] causal mask for queries at the last Tq of Tk positions."""
    i = torch.arange(Tq)[:, None] + Tk - Tq
    ok = torch.arange(Tk)[None, :] <= i
    return torch.zeros(Tq, Tk, dtype=F64).masked_fill(~ok, float("-inf"))[None, None]


@pytest.mark.parametrize("scaling", [DYNAMIC, LONGROPE], ids=["dynamic", "longrope"])
@KERNELS
def test_length_dependent_rope_matches_llama_generation(scaling, kernels):
    """Dynamic NTK (2x over 16 tokens) and LongRoPE against LlamaAttention with its DynamicCache and stateful
    rotary embedding in fp64, HF_TOL: the whole 40 tokens at once, and prefill 12 (within the original context:
    plain / short factors) + chunk 9 (reaching 21: rescaled / long factors) + 19 one-token steps, as transformers
    generates."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig, LlamaRotaryEmbedding

    cfg = attention(heads=4, kv_heads=2, head_dim=16, rope_theta=100.0, rope_scaling=scaling)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))

    def hf_pair():
        hc = LlamaConfig(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=1, vocab_size=16, max_position_embeddings=hf_max_positions(scaling),
                         rope_parameters=rope_parameters(100.0, scaling))
        hc._attn_implementation = "eager"
        hf = LlamaAttention(hc, layer_idx=0).double().eval()
        hf.load_state_dict(layer.state_dict())
        return hf, LlamaRotaryEmbedding(hc).double(), hc

    T = 40
    x = hidden(T=T)
    with torch.no_grad():
        hf, rope, _ = hf_pair()
        ref, _ = hf(x, position_embeddings=rope(x, torch.arange(T)[None]), attention_mask=causal_mask(T, T))
        assert_close(layer(x), ref, HF_TOL, f"{scaling.kind} vs LlamaAttention, whole sequence")
        hf, rope, hc = hf_pair()
        cache = DynamicCache(config=hc)
        outs = []
        for a, b in [(0, 12), (12, 21)] + [(t, t + 1) for t in range(21, T)]:
            pos = torch.arange(a, b)[None]
            o, _ = hf(x[:, a:b], position_embeddings=rope(x[:, a:b], pos), attention_mask=causal_mask(b - a, b),
                      cache=cache)
            outs.append(o)
        want = torch.cat(outs, dim=1)
        assert rel_err(want, ref) > 1000 * HF_TOL, "generation rotates earlier keys differently from one pass"
        got = through_cache(layer, x, cfg, splits=(12, 21))
        print(f"{scaling.kind} through the cache vs transformers' generation: {rel_err(got, want):.2e}")
        assert_close(got, want, HF_TOL, f"{scaling.kind} through the cache vs LlamaAttention with DynamicCache")


def hf_llama(cfg):
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig, LlamaRotaryEmbedding

    s = cfg.rope_scaling
    hc = LlamaConfig(hidden_size=D_MODEL, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, num_hidden_layers=1, vocab_size=16,
                     max_position_embeddings=int(s.factor * (s.original_context or 16)),
                     rope_parameters=rope_parameters(cfg.rope_theta, s))
    hc._attn_implementation = "eager"
    return LlamaAttention(hc, layer_idx=0).double().eval(), LlamaRotaryEmbedding(hc).double()


def through_cache(layer, x, cfg, splits=(17, 26)):
    """Prefill x[:, :a], a chunk x[:, a:b], then one-token steps: the outputs [B, T, d] through a KV cache."""
    B, T, _ = x.shape
    S = T if cfg.span is None else min(T, cfg.span)
    state = KVCache(torch.zeros(B, S, cfg.kv_heads, cfg.head_dim, dtype=F64),
                    torch.zeros(B, S, cfg.kv_heads, cfg.v_head_dim, dtype=F64), cfg.span, cfg.chunk)
    a, b = splits
    parts = [layer(x[:, :a], state, 0), layer(x[:, a:b], state, a)]
    parts += [layer.step(x[:, t], state, t)[:, None] for t in range(b, T)]
    return torch.cat(parts, dim=1)


def check_layer(layer, x, ref, cfg, what, hf=None):
    """Whole sequence and cached (prefill + chunk + decode) outputs both equal `ref` to HF_TOL; the kind's count
    equals the parameters of transformers' module `hf`."""
    if hf is not None:
        assert count(cfg, D_MODEL) == sum(p.numel() for p in hf.parameters()), "count vs transformers"
    with torch.no_grad():
        got = layer(x)
        print(f"{what}: relative error {rel_err(got, ref):.2e}")
        assert_close(got, ref, HF_TOL, what)
        cached = through_cache(layer, x, cfg)
        assert_close(cached, ref, HF_TOL, f"{what} through the cache")
        assert_close(cached, got, 1e-12, f"{what}: cache vs without")


@pytest.mark.parametrize("scaling", [
    RopeScaling("yarn", 4.0, original_context=16, beta_fast=8.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.5),
    RopeScaling("linear", 4.0),
], ids=["yarn", "linear"])
@KERNELS
def test_scaled_rope_attention_matches_llama(scaling, kernels):
    """LlamaAttention with yarn / linear RoPE (head_dim 16, theta 100, 40 tokens) in fp64, HF_TOL."""
    cfg = attention(heads=4, kv_heads=2, head_dim=16, rope_theta=100.0, rope_scaling=scaling)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    hf, rope = hf_llama(cfg)
    hf.load_state_dict(layer.state_dict())
    x = hidden(T=40)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=rope(x, torch.arange(40)[None]), attention_mask=additive_mask(40, None))
    check_layer(layer, x, ref, cfg, f"{scaling.kind} rope vs LlamaAttention", hf)
    plain = ours(Attention(replace(cfg, rope_scaling=None), D_MODEL, EPS, kernels))
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert rel_err(plain(x), ref) > 1000 * HF_TOL, "the scaling must matter"


@pytest.mark.parametrize("window", [None, 8], ids=["global", "window8"])
@KERNELS
def test_sinks_with_yarn_match_gpt_oss(window, kernels):
    """GptOssAttention (sinks, q/k/v/o biases, yarn 4x of 16 with truncate = false; sliding or full) in fp64."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssConfig, GptOssRotaryEmbedding

    yarn = RopeScaling("yarn", 4.0, original_context=16, beta_fast=8.0, beta_slow=1.0, truncate=False)
    cfg = replace(attention(heads=4, kv_heads=2, head_dim=8, window=window, rope_theta=150.0, rope_scaling=yarn,
                            qkv_bias=True, out_bias=True), sinks=True)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    perturb(layer)
    with torch.no_grad():
        layer.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 4.0]))  # some heads lean on the sink, some do not
    hc = GptOssConfig(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      num_hidden_layers=1, vocab_size=16, sliding_window=window or 128, max_position_embeddings=64,
                      layer_types=["sliding_attention" if window else "full_attention"], num_local_experts=2,
                      rope_parameters=rope_parameters(150.0, yarn))
    hc._attn_implementation = "eager"
    hf = GptOssAttention(hc, layer_idx=0).double().eval()
    rope = GptOssRotaryEmbedding(hc).double()
    hf.load_state_dict(layer.state_dict())
    x = hidden(T=40)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=rope(x, torch.arange(40)[None]), attention_mask=additive_mask(40, window))
    check_layer(layer, x, ref, cfg, "sinks vs GptOssAttention", hf)
    with torch.no_grad():
        layer.sinks.fill_(-1e9)  # a sink that takes nothing is plain attention
        plain = ours(Attention(replace(cfg, sinks=False), D_MODEL, EPS, kernels))
        plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "sinks"})
        assert_close(layer(x), plain(x), 1e-12, "a -inf sink vs no sink")
        assert rel_err(plain(x), ref) > 1000 * HF_TOL, "the sinks must matter"


@KERNELS
def test_softcap_matches_gemma2(kernels):
    """Gemma2Attention (attn_logit_softcapping 2, query_pre_attn_scalar 5 against head_dim 8, global) in fp64; the
    cap is small so that it matters."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2Config, Gemma2RotaryEmbedding

    cfg = replace(attention(heads=4, kv_heads=2, head_dim=8, rope_theta=100.0), softcap=2.0, query_pre_attn_scalar=5.0)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    with torch.no_grad():
        layer.q_proj.weight.mul_(20)  # scores well beyond the cap
    hc = Gemma2Config(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      query_pre_attn_scalar=5, attn_logit_softcapping=2.0, num_hidden_layers=1, vocab_size=16,
                      layer_types=["full_attention"], max_position_embeddings=64,
                      rope_parameters=rope_parameters(100.0, None))
    hc._attn_implementation = "eager"
    hf = Gemma2Attention(hc, layer_idx=0).double().eval()
    rope = Gemma2RotaryEmbedding(hc).double()
    hf.load_state_dict(layer.state_dict())
    x = hidden(T=40)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=rope(x, torch.arange(40)[None]), attention_mask=additive_mask(40, None))
    check_layer(layer, x, ref, cfg, "softcap vs Gemma2Attention", hf)
    plain = ours(Attention(replace(cfg, softcap=None), D_MODEL, EPS, kernels))
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert rel_err(plain(x), ref) > 1000 * HF_TOL, "the cap must matter"


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"], ids=["local", "global"])
@KERNELS
def test_gemma3_local_and_global_layers_match(layer_type, kernels):
    """Gemma3Attention in fp64 for both of Gemma-3's layer types, each one attention definition of ours: local
    (window 8, rope_theta 100) and global (rope_theta 1000, linear 8x); qk-norm (zero-centred there: weight - 1),
    query_pre_attn_scalar 6 against head_dim 16."""
    from transformers.models.gemma3.modeling_gemma3 import (
        Gemma3Attention, Gemma3RotaryEmbedding, Gemma3TextConfig,
    )

    local = layer_type == "sliding_attention"
    theta, scaling = (100.0, None) if local else (1000.0, RopeScaling("linear", 8.0))
    cfg = replace(attention(heads=4, kv_heads=2, head_dim=16, window=8 if local else None, rope_theta=theta,
                            rope_scaling=scaling, qk_norm=True), query_pre_attn_scalar=6.0)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    perturb(layer)
    hc = Gemma3TextConfig(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          query_pre_attn_scalar=6, sliding_window=8, num_hidden_layers=2, vocab_size=16,
                          rms_norm_eps=EPS, max_position_embeddings=64,
                          layer_types=["sliding_attention", "full_attention"],
                          rope_parameters={"sliding_attention": rope_parameters(100.0, None),
                                           "full_attention": rope_parameters(1000.0, RopeScaling("linear", 8.0))})
    hc._attn_implementation = "eager"
    hf = Gemma3Attention(hc, layer_idx=0 if local else 1).double().eval()
    rope = Gemma3RotaryEmbedding(hc).double()
    sd = dict(layer.state_dict())
    sd["q_norm.weight"], sd["k_norm.weight"] = sd["q_norm.weight"] - 1, sd["k_norm.weight"] - 1  # 1 + w there
    hf.load_state_dict(sd)
    x = hidden(T=40)
    with torch.no_grad():
        pe = rope(x, torch.arange(40)[None], layer_type=layer_type)
        ref, _ = hf(x, position_embeddings=pe, attention_mask=additive_mask(40, cfg.window))
    check_layer(layer, x, ref, cfg, f"Gemma-3 {layer_type} vs Gemma3Attention", hf)


@pytest.mark.parametrize("use_rope", [False, True], ids=["nope-temperature", "rope-chunk-l2"])
@KERNELS
def test_llama4_layers_match(use_rope, kernels):
    """Llama4TextAttention in fp64: a NoPE layer with attention temperature tuning (floor_scale 4, attn_scale 0.5,
    so the query scale grows within 40 tokens) and a RoPE layer (interleaved pairs: q/k rows reordered per head
    as import does) with the L2 qk-norm and chunks of 8; whole and through our cache (prefill, chunk, decode)."""
    from transformers.models.llama4.modeling_llama4 import (
        Llama4TextAttention, Llama4TextConfig, Llama4TextRotaryEmbedding,
    )

    cfg = replace(attention(heads=4, kv_heads=2, head_dim=8, rope_theta=100.0 if use_rope else None, qkv_bias=True,
                            out_bias=True), qk_l2_norm=use_rope, chunk=8 if use_rope else None,
                  temperature_floor=None if use_rope else 4, temperature_scale=None if use_rope else 0.5)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    perturb(layer)
    hc = Llama4TextConfig(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_hidden_layers=1, vocab_size=16, rms_norm_eps=EPS, attention_bias=True,
                          no_rope_layers=[int(use_rope)], attention_chunk_size=8, use_qk_norm=True,
                          attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5,
                          rope_parameters=rope_parameters(100.0, None))
    hc._attn_implementation = "eager"
    hf = Llama4TextAttention(hc, layer_idx=0).double().eval()
    sd = dict(layer.state_dict())
    for name in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"):  # halves -> interleaved pairs
        t = sd[name]
        sd[name] = t.reshape(-1, 2, 4, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    hf.load_state_dict(sd)
    x = hidden(T=40)
    T = 40
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = (j <= i) & ((j // 8 == i // 8) if use_rope else True)
    mask = torch.zeros(T, T, dtype=F64).masked_fill(~ok, float("-inf"))[None, None]
    with torch.no_grad():
        pe = Llama4TextRotaryEmbedding(hc)(x, torch.arange(T)[None]).to(torch.complex128)
        ref, _ = hf(x, position_embeddings=pe, attention_mask=mask)
    check_layer(layer, x, ref, cfg, f"Llama-4 {'RoPE' if use_rope else 'NoPE'} layer vs Llama4TextAttention", hf)


@KERNELS
def test_gated_output_matches_qwen3_next(kernels):
    """Qwen3NextAttention (gate, zero-centred qk-norm, partial RoPE 4 of 16) in fp64; its norms hold weight - 1."""
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        Qwen3NextAttention, Qwen3NextConfig, Qwen3NextRotaryEmbedding,
    )

    cfg = replace(attention(heads=4, kv_heads=2, head_dim=16, rope_theta=100.0, qk_norm=True, rope_dim=4), gate=True)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    perturb(layer)
    assert layer.q_proj.weight.shape == (4 * 2 * 16, D_MODEL)
    hc = Qwen3NextConfig(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=1, vocab_size=16, rms_norm_eps=EPS, max_position_embeddings=64,
                         rope_parameters=dict(rope_type="default", rope_theta=100.0, partial_rotary_factor=0.25),
                         layer_types=["full_attention"])
    hc._attn_implementation = "eager"
    hf = Qwen3NextAttention(hc, layer_idx=0).double().eval()
    rope = Qwen3NextRotaryEmbedding(hc).double()
    sd = dict(layer.state_dict())
    sd["q_norm.weight"], sd["k_norm.weight"] = sd["q_norm.weight"] - 1, sd["k_norm.weight"] - 1  # 1 + w there
    hf.load_state_dict(sd)
    x = hidden(T=40)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=rope(x, torch.arange(40)[None]), attention_mask=additive_mask(40, None))
    check_layer(layer, x, ref, cfg, "gated output vs Qwen3NextAttention", hf)


# ---- the float64 token loop: L2 qk-norm, chunks, and every variant together ------------------------


def token_loop(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Our layer's output written out per query, in fp64, from its state dict: projections, gate, qk norms,
    RoPE (the op already checked against transformers), then for each query p the keys it may see (causal,
    window, chunk), scaled scores, soft cap, sinks in the denominator, the weighted values, gate and o_proj."""
    cfg, sd = layer.cfg, {k: v.double() for k, v in layer.state_dict().items()}
    B, T, _ = x.shape
    H, Hkv, D, Dv = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim

    def lin(name, inp):
        out = inp @ sd[f"{name}.weight"].T
        return out + sd[f"{name}.bias"] if f"{name}.bias" in sd else out

    qg = lin("q_proj", x).view(B, T, H, -1)  # [B, T, H, D or 2D]
    q, gate = (qg[..., :D], qg[..., D:].reshape(B, T, H * D)) if cfg.gate else (qg, None)
    k, v = lin("k_proj", x).view(B, T, Hkv, D), lin("v_proj", x).view(B, T, Hkv, Dv)
    for name, t in (("q", q), ("k", k)):
        if cfg.qk_norm:
            t = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * sd[f"{name}_norm.weight"]
        if cfg.qk_l2_norm:
            t = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + EPS)
        if cfg.rope_theta is not None:
            cos, sin = rope_cos_sin(torch.arange(T), cfg.rotary_dim, cfg.rope_theta, F64, cfg.rope_scaling)
            t = apply_rope(t, cos, sin)
        if name == "q" and cfg.temperature_floor is not None:  # 1 + a ln(1 + floor((p + 1) / F)) per position
            t = t * torch.tensor([1 + cfg.temperature_scale * math.log1p((p + 1) // cfg.temperature_floor)
                                  for p in range(T)], dtype=F64)[None, :, None, None]
        q, k = (t, k) if name == "q" else (q, t)
    out = torch.zeros(B, T, H, Dv, dtype=F64)
    for b in range(B):
        for p in range(T):
            keys = [j for j in range(T) if j <= p and (cfg.window is None or j > p - cfg.window)
                    and (cfg.chunk is None or j // cfg.chunk == p // cfg.chunk)]
            for h in range(H):
                g = h // (H // Hkv)
                s = torch.stack([q[b, p, h] @ k[b, j, g] for j in keys]) / math.sqrt(D)
                if cfg.softcap is not None:
                    s = cfg.softcap * torch.tanh(s / cfg.softcap)
                e = torch.exp(s)
                denom = e.sum() + (torch.exp(sd["sinks"][h]) if cfg.sinks else 0)
                out[b, p, h] = sum(e[i] / denom * v[b, j, g] for i, j in enumerate(keys))
    o = out.reshape(B, T, H * Dv)
    return lin("o_proj", o * torch.sigmoid(gate) if gate is not None else o)


@pytest.mark.parametrize("variant", [
    dict(qk_l2_norm=True),
    dict(chunk=8),
    dict(chunk=5, qk_l2_norm=True, sinks=True, softcap=3.0),
    dict(window=6, sinks=True, softcap=3.0, gate=True),
    dict(rope_theta=None, temperature_floor=4, temperature_scale=0.5),
    dict(chunk=6, qk_l2_norm=True, temperature_floor=3, temperature_scale=0.2),
], ids=["l2-qk-norm", "chunk8", "chunk5-l2-sinks-softcap", "window6-sinks-softcap-gate", "nope-temperature",
        "chunk6-l2-temperature"])
@KERNELS
def test_variants_match_the_token_loop_with_cache(variant, kernels):
    """Each variant (and combinations) equals the float64 token loop to 1e-12, whole and through the cache
    (prefill 17, chunk 9, 14 one-token steps: chunk boundaries fall inside both the prefill and the chunk)."""
    cfg = replace(attention(heads=4, kv_heads=2, head_dim=8, rope_theta=100.0, qkv_bias=True), **variant)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    if cfg.sinks:
        with torch.no_grad():
            layer.sinks.copy_(torch.tensor([1.0, -2.0, 0.0, 3.0]))
    x = hidden(T=40)
    with torch.no_grad():
        want = token_loop(layer, x)
        got = layer(x)
        assert_close(got, want, 1e-12, f"{variant} vs the token loop")
        assert_close(through_cache(layer, x, cfg), want, 1e-12, f"{variant} through the cache vs the token loop")
        if not cfg.gate:  # the same weights without the variant give another output
            base = ours(Attention(attention(heads=4, kv_heads=2, head_dim=8, rope_theta=100.0, qkv_bias=True),
                                  D_MODEL, EPS, kernels))
            base.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "sinks"})
            assert rel_err(base(x), want) > 1e-6, "the variant must change the output"


def test_chunked_cache_holds_one_chunk():
    """A chunked layer's cache is a ring of min(max_context, C) slots, as the memory model counts."""
    from ltmdsl.runtime.cache import CacheRequest
    from ltmdsl.runtime.kinds.attention import new_cache

    cfg = replace(attention(heads=4, kv_heads=2, head_dim=8), chunk=16)
    for context, slots in ((64, 16), (10, 10)):
        c = new_cache(cfg, CacheRequest(batch_size=2, max_context=context, kv_dtype=F64, state_dtype=F64,
                                          conv_taps="full", device="cpu"))
        assert c.k.shape == (2, slots, 2, 8) and c.chunk == 16


VARIANT_SPEC = """
model v {
    vocab = 40
    d_model = 32
    dtype = fp32
    layer chunked = attention(heads = 4, kv_heads = 2, chunk = 6, qk_l2_norm = true, rope_theta = 100)
    layer sink = attention(heads = 4, kv_heads = 2, window = 5, sinks = true, softcap = 20,
                           rope_scaling = yarn(factor = 4, original_context = 8))
    layer gated = attention(heads = 4, kv_heads = 2, gate = true, qk_norm = true,
                            rope_scaling = linear(factor = 2))
    layer ffn = mlp(d_ff = 48)
    stack { chunked ffn sink ffn gated ffn }
}
"""


def test_model_with_variants_decodes_as_it_prefills_and_counts_its_cache():
    """A whole model of chunked, sink + soft-cap + yarn and gated + linear-RoPE layers in float64: prefill 11 then
    9 steps equals one prefill of 20 (1e-10); its cache equals the memory model's bytes, and its parameters the
    IR's count."""
    import ltmdsl
    from ltmdsl.memory import cache_bytes
    from ltmdsl.runtime.build import build
    from ltmdsl.units import DTYPES

    ir = ltmdsl.loads(VARIANT_SPEC).model
    model = build(ir).double().eval()
    assert sum(p.numel() for p in model.parameters()) == ir.params_total
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20, dtype=F64)
        parts = [model(ids[:, :11], cache)] + [model(ids[:, t : t + 1], cache) for t in range(11, 20)]
    assert_close(torch.cat(parts, dim=1), full, 1e-10, "prefill 11 + 9 steps vs prefill 20")
    cache = model.new_cache(3, 20, dtype=torch.float32)
    assert cache.breakdown() == cache_bytes(ir, batch=3, context=20, kv_dtype=DTYPES["fp32"],
                                            state_dtype=DTYPES["fp32"])


LOW_PRECISION_SPEC = VARIANT_SPEC.replace("stack { chunked ffn sink ffn gated ffn }", """layer lat = mla(heads = 4,
        q_lora_rank = 12, kv_lora_rank = 10, qk_nope_head_dim = 8, qk_rope_head_dim = 4, v_head_dim = 6,
        rope_scaling = yarn(factor = 4, original_context = 8, mscale = 1, mscale_all_dim = 1))
    stack { chunked ffn sink ffn gated ffn lat ffn }""")


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_variants_and_mla_in_low_precision_match_fp32(dtype, tol):
    """The variant layers and an mla layer in bf16 (1e-2) and fp16 (5e-3) against the fp32 model with the same
    weights: one forward, and prefill 14 + 10 steps through the caches."""
    import ltmdsl

    spec = ltmdsl.loads(LOW_PRECISION_SPEC)
    ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ltmdsl.build(spec, dtype=torch.float32, seed=0)(ids)
        model = ltmdsl.build(spec, dtype=dtype, seed=0)
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_context=24)
        parts = [model(ids[:, :14], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(14, 24)]
    assert full.dtype == dtype
    assert_close(full.float(), ref, tol, f"{dtype} forward vs fp32")
    assert_close(torch.cat(parts, dim=1).float(), ref, tol, f"{dtype} decode vs fp32")


def test_sinks_softcap_and_mla_gradients_match_finite_differences():
    """Training goes through the explicit-softmax path and the mla prefill: torch.autograd.gradcheck (fp64) of the
    output with respect to the input and the sink logits, on tiny layers."""
    from ltmdsl.runtime.kinds.mla import MLA
    from test_rt_mla import mla

    cfg = replace(attention(heads=2, kv_heads=1, head_dim=4, rope_theta=100.0), sinks=True, softcap=2.0, chunk=3)
    layer = ours(Attention(cfg, D_MODEL, EPS, TORCH_KERNELS))
    x = hidden(T=7, B=1).requires_grad_()
    sinks = layer.sinks.detach().clone().requires_grad_()

    def f(inp, s):
        return torch.func.functional_call(layer, {**dict(layer.named_parameters()), "sinks": s}, (inp,))

    assert torch.autograd.gradcheck(f, (x, sinks))
    lat = ours(MLA(mla(heads=2, q_lora_rank=3, kv_lora_rank=4, nope=2, rope=2, v=3), D_MODEL, 1e-6, TORCH_KERNELS))
    assert torch.autograd.gradcheck(lambda inp: lat(inp), (x,))
