"""The parallel frame (attention and Mamba-2 on the same normed input, scaled and summed in one residual):
against a float64 token loop of its two branches, against transformers' FalconH1 decoder layers in float64,
chunked prefill + cached decode against one pass, and the cache the runtime allocates against the memory model."""

from __future__ import annotations

import pytest
import torch

import ltmdsl
from helpers import assert_close

F64 = 1e-10  # float64 against float64: the same arithmetic in another order
HF_TOL = 1e-6  # float64 against transformers' float64 modules (REFERENCE tolerance for module checks)

SPEC = """model m {{
    vocab = 61
    d_model = 32
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    layer attn = attention(heads = 4, kv_heads = 2, rope_theta = 10000.0)
    layer ssm = mamba2(d_state = 8, head_dim = 12, heads = 4, n_groups = 2, d_conv = 3, chunk = 8)
    layer mix = parallel(a = attn, b = ssm{scales})
    layer ffn = mlp(d_ff = 40)
    stack {{ repeat 2 {{ mix ffn }} }}
}}
budget b for m {{ inference context = 64, batch = 2 }}
"""
SCALES = ", a_in = 0.7, a_out = 1.3, b_in = 0.6, b_out = 0.8"


def _model(scales: str = SCALES, seed: int = 0):
    spec = ltmdsl.loads(SPEC.format(scales=scales))
    return spec, ltmdsl.build(spec, seed=seed).double().eval()


def test_forward_is_the_scaled_sum_of_its_branches_token_by_token():
    """Parallel forward (chunked SSD scan, SDPA) == a_out * A(a_in x) + b_out * B(b_in x) with each branch run
    one token at a time through its own step and cache (float64)."""
    spec, model = _model()
    mix = model.layers[0].mixer
    cfg = mix.cfg
    x = torch.randn(2, 19, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = mix(x)  # [B, T, d]
        cache = model.new_cache(2, 19)
        sa, sb = cache.layers[0].a, cache.layers[0].b
        ref = torch.stack([cfg.a_out * mix.a.step(x[:, t] * cfg.a_in, sa, t)
                           + cfg.b_out * mix.b.step(x[:, t] * cfg.b_in, sb, t) for t in range(19)], 1)
    assert_close(got, ref, F64, "parallel forward vs branch token loop")


@pytest.mark.parametrize("scales", ["", SCALES], ids=["unscaled", "scaled"])
def test_chunked_prefill_and_decode_equal_one_pass(scales):
    spec, model = _model(scales)
    ids = torch.randint(0, 61, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 64)
        parts = [model(ids[:, :9], cache), model(ids[:, 9:16], cache)]
        parts += [model(ids[:, t:t + 1], cache) for t in range(16, 23)]
    assert_close(torch.cat(parts, 1), full, F64, "prefill 9 + 7, then 7 decode steps")


def test_cache_bytes_are_the_memory_model():
    """The pair of branch caches counts towards each branch's component, to the byte."""
    spec, model = _model()
    report = spec.memory("b")
    cache = model.float().new_cache(2, 64)
    assert cache.breakdown() == {"kv_cache": report.components["kv_cache"],
                                 "recurrent_state": report.components["recurrent_state"]}
    assert model.num_parameters() == spec.model.params_total


def test_matches_transformers_falcon_h1_decoder_layers():
    """Two FalconH1 decoder layers (attention with RoPE beside a Mamba-2 mixer with its gated RMSNorm, their
    input and output multipliers, then the SwiGLU MLP) in float64 against ours with the same weights."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconH1Config(
        vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=48, mamba_n_heads=4, mamba_d_state=8, mamba_n_groups=2, mamba_d_conv=3,
        mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False, attention_in_multiplier=0.7,
        attention_out_multiplier=1.3, ssm_in_multiplier=0.6, ssm_out_multiplier=0.8, rms_norm_eps=1e-5)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    spec, ours = _model(seed=4)
    weights = {"model.embed_tokens.weight": "embed.weight", "model.final_layernorm.weight": "final_norm.weight",
               "lm_head.weight": "lm_head.weight"}
    for i in range(2):
        h, m, f = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        weights[h + "input_layernorm.weight"] = m + "norm.weight"
        weights[h + "pre_ff_layernorm.weight"] = f + "norm.weight"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[f"{h}self_attn.{n}.weight"] = f"{m}mixer.a.{n}.weight"
        for n in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                  "out_proj.weight"):
            weights[f"{h}mamba.{n}"] = f"{m}mixer.b.{n}"
        for n in ("gate_proj", "up_proj", "down_proj"):
            weights[f"{h}feed_forward.{n}.weight"] = f"{f}mixer.{n}.weight"
    mine = dict(ours.named_parameters())
    theirs = dict(hf.named_parameters())
    assert sorted(weights) == sorted(theirs) and sorted(weights.values()) == sorted(mine)
    with torch.no_grad():
        for hf_name, our_name in weights.items():
            theirs[hf_name].copy_(mine[our_name].reshape(theirs[hf_name].shape))
    assert sum(p.numel() for p in hf.parameters()) == spec.model.params_total
    ids = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, HF_TOL, "FalconH1ForCausalLM (float64)")
