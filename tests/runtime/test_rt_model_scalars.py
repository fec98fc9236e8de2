"""Model-level scalars, soft cap, zero-centred RMSNorm and sandwich norms (ModelIR, NormConfig, SubLayer).

Against transformers' own models in float64 with our weights:
    Gemma2ForCausalLM   embedding * sqrt(d), (1 + w) RMSNorms, pre and post norms around attention and MLP,
                        tied head, final-logit soft cap (exact-erf GELU chosen so the MLPs agree)
    GraniteForCausalLM  embedding_multiplier, residual_multiplier, attention_multiplier (attention `scale`),
                        logits_scaling
transformers' RMSNorms normalise in fp32 even in a float64 model (measured: Gemma-2 6.8e-7, Granite 1.1e-7);
Gemma's (1 + w) in fp32 as well, so its comparisons are held to GEMMA_TOL = 1e-5 and Granite's to HF_TOL = 1e-6. A float64 loop over the formulas of
runtime/model.py checks prefill and decode (ORACLE_TOL = 1e-12).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import ltmdsl
from ltmdsl.runtime.build import build

F64 = torch.float64
HF_TOL = 1e-6
GEMMA_TOL = 1e-5
ORACLE_TOL = 1e-12
V, D = 48, 16


def model_of(text: str, seed: int = 0, perturb: float = 0.3, std: float = 0.5):
    """Our model in float64: weights redrawn N(0, std^2) so logits reach the soft cap, every norm weight moved
    off its init value (so (1 + w) and the post norms matter)."""
    m = build(ltmdsl.loads(text), seed=seed).double().eval()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(perturb * torch.randn(p.shape, generator=g, dtype=F64))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=F64))
    return m


IDS = torch.tensor([[3, 17, 5, 40, 9, 22, 31, 0, 12, 47, 8]])

SCALED = f"""
model scaled {{
    vocab = {V}
    d_model = {D}
    dtype = fp32
    norm = rmsnorm(eps = 1e-6, zero_centred = true)
    embed_scale = d_model ** 0.5
    residual_scale = 0.22
    logit_scale = 0.125
    logit_cap = 0.3
    layer f = mlp(d_ff = 24, act = swiglu, post_norm = rmsnorm(eps = 1e-6, zero_centred = true))
    layer g = mlp(d_ff = 20, act = gelu, norm = layernorm(eps = 1e-5), post_norm = layernorm(eps = 1e-5))
    stack {{ f g f }}
}}
"""


def _rms(x, w, eps, centred):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ((1 + w) if centred else w)


def _norm(cfg, mod, x):
    if cfg.kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, cfg.eps)
    return _rms(x, mod.weight, cfg.eps, cfg.zero_centred)


def oracle(m, ids):
    """The formulas of runtime/model.py written out: no fused add, every scalar applied where it says."""
    ir = m.ir
    h = m.embed.weight[ids] * ir.embed_scale
    for layer, block in zip(ir.layers, m.layers):
        x = _norm(layer.norm, block.norm, h)
        mlp = block.mixer
        up = x @ mlp.up_proj.weight.t()
        act = F.silu(x @ mlp.gate_proj.weight.t()) * up if mlp.gate_proj is not None else F.gelu(up)
        out = act @ mlp.down_proj.weight.t()
        if layer.post_norm is not None:
            out = _norm(layer.post_norm, block.post_norm, out)
        h = h + ir.residual_scale * out
    z = _norm(ir.final_norm, m.final_norm, h) @ m.lm_head.weight.t() * ir.logit_scale
    return ir.logit_cap * torch.tanh(z / ir.logit_cap)


def test_scalars_and_norms_match_the_formulas_in_prefill_and_decode():
    m = model_of(SCALED)
    with torch.no_grad():
        ref = oracle(m, IDS)
        assert_close(m(IDS), ref, ORACLE_TOL, "prefill")
        assert ref.abs().max() < m.ir.logit_cap and ref.abs().max() > 0.5 * m.ir.logit_cap  # the cap is active
        cache = m.new_cache(1, IDS.shape[1])
        steps = [m(IDS[:, i:i + 1], cache) for i in range(IDS.shape[1])]
        assert_close(torch.cat(steps, 1), ref, ORACLE_TOL, "decode")


def test_each_scalar_changes_the_logits():
    """No setting is silently ignored: turning any one back to its default changes the output."""
    base = model_of(SCALED)
    with torch.no_grad():
        ref = base(IDS)
    for old, new in [("embed_scale = d_model ** 0.5", ""), ("residual_scale = 0.22", ""),
                     ("logit_scale = 0.125", ""), ("logit_cap = 0.3", ""),
                     ("post_norm = rmsnorm(eps = 1e-6, zero_centred = true)", "bias = false")]:
        other = model_of(SCALED.replace(old, new))
        with torch.no_grad():
            assert (other(IDS) - ref).abs().max() > 1e-3, old


def test_parameter_counts():
    m = ltmdsl.loads(SCALED).model
    mlp_f, mlp_g = 3 * D * 24, 2 * D * 20
    # embed + head + final rmsnorm; f: norm + mlp + post rmsnorm (twice); g: layernorm + mlp + post layernorm
    assert m.params_total == 2 * V * D + D + 2 * (D + mlp_f + D) + (2 * D + mlp_g + 2 * D)
    assert build(ltmdsl.loads(SCALED)).num_parameters() == m.params_total


def test_zero_centred_norm_initialises_to_the_identity_scale():
    m = build(ltmdsl.loads(SCALED))
    assert torch.equal(m.layers[0].norm.weight, torch.zeros(D))
    assert torch.equal(m.layers[1].norm.weight, torch.ones(D))  # a layernorm is never zero-centred


transformers = pytest.importorskip("transformers")


def _load(hf, weights: dict):
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    tied = ["lm_head.weight"] if hf.config.tie_word_embeddings else []
    assert not unexpected and not [n for n in missing if "rotary" not in n and n not in tied], (missing, unexpected)
    return hf.double().eval()


GEMMA2 = f"""
model gemma2_tiny {{
    vocab = {V}
    d_model = {D}
    dtype = fp32
    head = tied
    norm = rmsnorm(eps = 1e-6, zero_centred = true)
    embed_scale = d_model ** 0.5
    logit_cap = 2.5
    layer attn = attention(heads = 2, kv_heads = 1, head_dim = 8,
                           post_norm = rmsnorm(eps = 1e-6, zero_centred = true))
    layer ffn = mlp(d_ff = 24, act = geglu, post_norm = rmsnorm(eps = 1e-6, zero_centred = true))
    stack {{ repeat 2 {{ attn ffn }} }}
}}
"""


def test_gemma2_matches_transformers():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    m = model_of(GEMMA2)
    hc = Gemma2Config(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, hidden_activation="gelu",
                      attn_logit_softcapping=None, final_logit_softcapping=2.5, sliding_window=64, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, attn_implementation="eager")
    hf = Gemma2ForCausalLM(hc)
    w = {"model.embed_tokens.weight": m.embed.weight, "model.norm.weight": m.final_norm.weight}
    for j in range(2):
        a, f = m.layers[2 * j], m.layers[2 * j + 1]
        p = f"model.layers.{j}."
        w.update({p + "input_layernorm.weight": a.norm.weight, p + "post_attention_layernorm.weight": a.post_norm.weight,
                  p + "pre_feedforward_layernorm.weight": f.norm.weight,
                  p + "post_feedforward_layernorm.weight": f.post_norm.weight,
                  **{p + f"self_attn.{n}.weight": getattr(a.mixer, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                  **{p + f"mlp.{n}.weight": getattr(f.mixer, n).weight for n in ("gate_proj", "up_proj", "down_proj")}})
    hf = _load(hf, {k: v.detach().clone() for k, v in w.items()})
    with torch.no_grad():
        ours, theirs = m(IDS), hf(IDS).logits
    assert ours.abs().max() > 0.5 * 2.5  # the soft cap is reached
    assert_close(ours, theirs, GEMMA_TOL, "Gemma2ForCausalLM")


GRANITE = f"""
model granite_tiny {{
    vocab = {V}
    d_model = {D}
    dtype = fp32
    norm = rmsnorm(eps = 1e-6)
    embed_scale = 12.0
    residual_scale = 0.22
    logit_scale = 1 / 8.0
    layer attn = attention(heads = 2, kv_heads = 1, scale = 0.3)
    layer ffn = mlp(d_ff = 24)
    stack {{ repeat 2 {{ attn ffn }} }}
}}
"""


def test_granite_matches_transformers():
    from transformers import GraniteConfig, GraniteForCausalLM

    m = model_of(GRANITE)
    hc = GraniteConfig(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=8.0,
                       attention_multiplier=0.3, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       attn_implementation="eager")
    hf = GraniteForCausalLM(hc)
    w = {"model.embed_tokens.weight": m.embed.weight, "model.norm.weight": m.final_norm.weight,
         "lm_head.weight": m.lm_head.weight}
    for j in range(2):
        a, f = m.layers[2 * j], m.layers[2 * j + 1]
        p = f"model.layers.{j}."
        w.update({p + "input_layernorm.weight": a.norm.weight, p + "post_attention_layernorm.weight": f.norm.weight,
                  **{p + f"self_attn.{n}.weight": getattr(a.mixer, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                  **{p + f"mlp.{n}.weight": getattr(f.mixer, n).weight for n in ("gate_proj", "up_proj", "down_proj")}})
    hf = _load(hf, {k: v.detach().clone() for k, v in w.items()})
    with torch.no_grad():
        assert_close(m(IDS), hf(IDS).logits, HF_TOL, "GraniteForCausalLM")


def test_attention_scale_changes_the_scores():
    """`scale` replaces 1/sqrt(D); none is 1/sqrt(D) exactly."""
    plain = model_of(GRANITE.replace(", scale = 0.3", ""))
    same = model_of(GRANITE.replace("scale = 0.3", f"scale = {8 ** -0.5!r}"))
    other = model_of(GRANITE)
    with torch.no_grad():
        assert torch.equal(plain(IDS), same(IDS))
        assert (plain(IDS) - other(IDS)).abs().max() > 1e-3


def test_zero_centred_rmsnorm_matches_gemma3():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from ltmdsl.ir import NormConfig
    from ltmdsl.runtime.kernels import TORCH_KERNELS
    from ltmdsl.runtime.norm import Norm

    ours = Norm(NormConfig("rmsnorm", 1e-6, zero_centred=True), D, TORCH_KERNELS).double()
    theirs = Gemma3RMSNorm(D, eps=1e-6).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=F64))
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        assert_close(ours(x)[0], theirs(x), GEMMA_TOL, "Gemma3RMSNorm")  # transformers normalises in fp32
