"""The mla kind against transformers' DeepseekV3Attention in float64 (HF_TOL = 1e-6): whole-sequence prefill,
and prefill + chunk + absorbed one-token decode through our latent cache; the absorbed decode op against its
up-projecting oracle (1e-12); exact parameter counts at DeepSeek-V3's and DeepSeek-V2-Lite's attention shapes;
the latent cache's bytes against the memory model."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rel_err
from test_rt_layers import D_MODEL, HF_TOL, additive_mask, hidden, ours, perturb

import ltmdsl
from ltmdsl.ir import RopeScaling
from ltmdsl.kinds.mla import MLAConfig, count
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds.mla import MLA, LatentCache, state_names
from ltmdsl.runtime.ops_mla import mla_decode, mla_decode_reference

transformers = pytest.importorskip("transformers")
F64 = torch.float64
KERNELS = pytest.mark.parametrize("kernels", [TORCH_KERNELS, REFERENCE_KERNELS], ids=["sdpa", "reference"])
YARN = RopeScaling("yarn", 4.0, original_context=16, beta_fast=8.0, beta_slow=1.0, mscale=0.8, mscale_all_dim=0.6)


def mla(heads=4, q_lora_rank=12, kv_lora_rank=10, nope=8, rope=4, v=6, theta=100.0, scaling=None, bias=False):
    return MLAConfig(heads, q_lora_rank, kv_lora_rank, nope, rope, v, theta, scaling, bias, 1e-6)


def hf_config(cfg: MLAConfig, d: int, **extra):
    from transformers import DeepseekV3Config

    rope = dict(rope_type="default", rope_theta=cfg.rope_theta)
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = dict(rope_type="yarn", rope_theta=cfg.rope_theta, factor=s.factor, beta_fast=s.beta_fast,
                    beta_slow=s.beta_slow, mscale=s.mscale, mscale_all_dim=s.mscale_all_dim,
                    original_max_position_embeddings=s.original_context)
    hc = DeepseekV3Config(hidden_size=d, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                          q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                          qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                          v_head_dim=cfg.v_head_dim, attention_bias=cfg.bias, rope_parameters=rope,
                          max_position_embeddings=64, **extra)
    hc._attn_implementation = "eager"
    return hc


@pytest.mark.parametrize("cfg", [mla(), mla(q_lora_rank=None, bias=True), mla(scaling=YARN)],
                         ids=["q-lora", "no-q-lora-bias", "q-lora-yarn-mscale"])
@KERNELS
def test_mla_matches_deepseek_v3_with_latent_cache(cfg, kernels):
    """DeepseekV3Attention (interleaved RoPE, latent norms eps 1e-6; with yarn, its mscale_all_dim softmax scale
    and attention factor) vs ours over 40 tokens in fp64: whole, and prefill 17 + chunk 9 + 14 absorbed steps."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    layer = ours(MLA(cfg, D_MODEL, 1e-5, kernels))
    perturb(layer)
    hc = hf_config(cfg, D_MODEL, num_hidden_layers=1, vocab_size=16)
    hf = DeepseekV3Attention(hc, layer_idx=0).double().eval()
    rope = DeepseekV3RotaryEmbedding(hc).double()
    hf.load_state_dict(layer.state_dict())
    assert set(state_names(cfg)) == set(layer.state_dict()) == set(hf.state_dict())
    assert count(cfg, D_MODEL) == sum(p.numel() for p in hf.parameters())
    T, B = 40, 2
    x = hidden(T=T, B=B)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=rope(x, torch.arange(T)[None]), attention_mask=additive_mask(T, None))
        got = layer(x)
        print(f"mla vs DeepseekV3Attention: relative error {rel_err(got, ref):.2e}")
        assert_close(got, ref, HF_TOL, "mla vs DeepseekV3Attention")
        state = LatentCache(torch.zeros(B, T, cfg.kv_lora_rank, dtype=F64), torch.zeros(B, T, cfg.qk_rope_head_dim,
                                                                                          dtype=F64))
        parts = [layer(x[:, :17], state, 0), layer(x[:, 17:26], state, 17)]
        parts += [layer.step(x[:, t], state, t)[:, None] for t in range(26, T)]
        cached = torch.cat(parts, dim=1)
        assert_close(cached, ref, HF_TOL, "mla through the latent cache vs DeepseekV3Attention")
        assert_close(cached, got, 1e-12, "mla through the latent cache vs without")


@KERNELS
def test_nope_mla_matches_kimi_linear(kernels):
    """Kimi-Linear's MLA layers have no RoPE: rope_theta = none against KimiLinearAttention in fp64 (HF_TOL), whole
    and through the latent cache; a rotated layer with the same weights differs."""
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearAttention, KimiLinearConfig

    cfg = mla(theta=None, q_lora_rank=None)
    layer = ours(MLA(cfg, D_MODEL, 1e-5, kernels))
    perturb(layer)
    hc = KimiLinearConfig(hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                          kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                          qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, num_hidden_layers=1,
                          vocab_size=16, layer_types=["full_attention"], mlp_layer_types=["dense"])
    hc._attn_implementation = "eager"
    hf = KimiLinearAttention(hc, layer_idx=0).double().eval()
    hf.load_state_dict(layer.state_dict())
    assert count(cfg, D_MODEL) == sum(p.numel() for p in hf.parameters())
    T, B = 30, 2
    x = hidden(T=T, B=B)
    with torch.no_grad():
        ref, _ = hf(x, attention_mask=additive_mask(T, None))
        got = layer(x)
        assert_close(got, ref, HF_TOL, "NoPE mla vs KimiLinearAttention")
        state = LatentCache(torch.zeros(B, T, cfg.kv_lora_rank, dtype=F64), torch.zeros(B, T, cfg.qk_rope_head_dim,
                                                                                          dtype=F64))
        parts = [layer(x[:, :11], state, 0)] + [layer.step(x[:, t], state, t)[:, None] for t in range(11, T)]
        assert_close(torch.cat(parts, dim=1), ref, HF_TOL, "NoPE mla through the latent cache")
        roped = ours(MLA(mla(q_lora_rank=None), D_MODEL, 1e-5, kernels))
        roped.load_state_dict(layer.state_dict())
        assert rel_err(roped(x), ref) > 1000 * HF_TOL


def test_absorbed_decode_equals_its_oracle():
    g = torch.Generator().manual_seed(0)
    B, H, Dn, Dr, Dv, Rkv, S = 2, 3, 5, 4, 6, 7, 11

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    args = (r(B, H, Dn), r(B, H, Dr), r(B, S, Rkv), r(B, S, Dr), r(H, Dn, Rkv), r(H, Dv, Rkv))
    for n in (1, 6, S):
        assert_close(mla_decode(*args, n_valid=n, scale=0.3), mla_decode_reference(*args, n_valid=n, scale=0.3),
                     1e-12, f"absorbed decode over {n} slots")


@pytest.mark.parametrize("spec, model", [
    # DeepSeek-V3: d 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128
    ("mla(heads = 128, q_lora_rank = 1536, kv_lora_rank = 512, rope_theta = 10000, rope_scaling = yarn(factor = 40,"
     " original_context = 4096, beta_fast = 32, beta_slow = 1, mscale = 1, mscale_all_dim = 1))", 7168),
    # DeepSeek-V2-Lite: d 2048, 16 heads, no q_lora, kv_lora 512, nope 128, rope 64, v 128
    ("mla(heads = 16, kv_lora_rank = 512)", 2048),
], ids=["deepseek-v3", "deepseek-v2-lite"])
def test_parameter_count_equals_transformers_at_published_shapes(spec, model):
    """The kind's count equals DeepseekV3Attention's parameters (built on the meta device) at full size."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    ir = ltmdsl.loads(f"model m {{\n vocab = 2\n d_model = {model}\n layer x = {spec}\n stack {{ x }}\n}}\n").model
    cfg = ir.layers[0].mixer
    with torch.device("meta"):
        hf = DeepseekV3Attention(hf_config(cfg, model), layer_idx=0)
    assert ir.layers[0].params - model == sum(p.numel() for p in hf.parameters())


SPEC = """
model m {
    vocab = 40
    d_model = 32
    dtype = fp32
    layer lat = mla(heads = 4, q_lora_rank = 12, kv_lora_rank = 10, qk_nope_head_dim = 8, qk_rope_head_dim = 4,
                    v_head_dim = 6, rope_theta = 100)
    layer attn = attention(heads = 4, kv_heads = 2)
    layer ffn = mlp(d_ff = 48)
    stack { lat ffn attn ffn lat ffn }
}
"""


def test_model_latent_cache_bytes_and_decode():
    """The runtime's cache equals the memory model (the latent: (10 + 4) values per token per mla layer), and a
    whole model decodes as it prefills (fp64, 1e-10)."""
    from ltmdsl.memory import cache_bytes
    from ltmdsl.runtime.build import build
    from ltmdsl.units import DTYPES

    ir = ltmdsl.loads(SPEC).model
    model = build(ir).double().eval()
    assert sum(p.numel() for p in model.parameters()) == ir.params_total
    cache = model.new_cache(3, 20, dtype=torch.float32)
    predicted = cache_bytes(ir, batch=3, context=20, kv_dtype=DTYPES["fp32"], state_dtype=DTYPES["fp32"])
    assert cache.breakdown() == predicted
    assert predicted["kv_cache"] == 2 * 3 * (10 + 4) * 20 * 4 + 3 * 2 * (8 + 8) * 20 * 4
    ids = torch.randint(0, 40, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 14, dtype=F64)
        parts = [model(ids[:, :10], cache)] + [model(ids[:, t : t + 1], cache) for t in range(10, 14)]
    assert_close(torch.cat(parts, dim=1), full, 1e-10, "prefill 10 + 4 steps vs prefill 14")
