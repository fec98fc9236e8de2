"""MoE variants (ltmdsl/kinds/moe.py) against transformers' own blocks in float64 and a float64 token loop.

transformers' modules, loaded with our weights and run in float64 (HF_TOL = 1e-6 relative: DeepSeek's
routers compute their logits and scores in fp32 even in a float64 module):
    DeepseekV3MoE   sigmoid scores, selection bias (noaux_tc), grouped top-k (top2_sum), renorm, scaling, shared
    DeepseekV2Moe   softmax scores, group-limited greedy (max), routed scaling, shared experts
    GptOssMLP       router bias, topk_softmax, expert biases, clamped SwiGLU
    Qwen3NextSparseMoeBlock  softmax renorm, a shared expert of its own width behind a sigmoid gate
    Llama4TextMoe   top-1 sigmoid routing that weighs the expert input, plus a shared expert
    KimiLinearMoE   DeepSeek-V3 routing with n_shared shared experts (Kimi-Linear)
    NemotronHMoE    relu2 experts, sigmoid + selection bias in groups, renorm, scaling, a relu2 shared expert
    GraniteMoeHybridMoE + GraniteMoeHybridMLP   topk_softmax experts plus a shared expert of its own width
    Qwen2MoeForCausalLM  a whole model: a dense first layer, then gated shared-expert MoE layers
and, for each family, the block transformers builds at its published sizes (meta device) has exactly our count.
The token loop (`oracle`) recomputes every routing rule one token at a time in plain Python (sorting
instead of topk, explicit group masks) with dense per-expert MLPs; tolerance 1e-12 (float64 both sides).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from ltmdsl.kinds.base import ModelContext
from ltmdsl.kinds.moe import KIND as MOE_KIND
from ltmdsl.kinds.moe import MoEConfig
from ltmdsl.ir import NormConfig
from ltmdsl.runtime.kinds.moe import MoE, state_names

F64 = torch.float64
D = 32
HF_TOL = 1e-6
ORACLE_TOL = 1e-12


def cfg_of(**kw) -> MoEConfig:
    """A MoE config through the kind's own build (defaults and checks as a spec gets them)."""
    values = {p.name: kw.pop(p.name, p.default) for p in MOE_KIND.params}
    assert not kw, f"unknown moe parameters {sorted(kw)}"
    return MOE_KIND.build(values, ModelContext(D, NormConfig("rmsnorm", 1e-5)))


def ours(cfg: MoEConfig, seed: int = 0, std: float = 0.0) -> MoE:
    """Our MoE in float64; std > 0 redraws every tensor N(0, std^2) (biases, the selection bias included)."""
    m = MoE(cfg, D)
    m.init_weights(torch.Generator().manual_seed(seed))
    m = m.double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if std or "bias" in name:
                t.copy_((std or 0.5) * torch.randn(t.shape, generator=g, dtype=F64))
    return m


def hidden(T=13, B=2, seed=1, scale=1.0):
    return scale * torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- the float64 token loop -------------------------------------------------------------------


def _act(cfg: MoEConfig, gate, up):
    if cfg.activation == "swiglu_clamped":
        g = min(gate, cfg.swiglu_limit) if isinstance(gate, float) else gate.clamp(max=cfg.swiglu_limit)
        u = up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
        return g * torch.sigmoid(cfg.swiglu_alpha * g) * (u + 1)
    return {"swiglu": lambda: F.silu(gate) * up, "geglu": lambda: F.gelu(gate) * up, "gelu": lambda: F.gelu(up),
            "relu2": lambda: F.relu(up) ** 2, "relu": lambda: F.relu(up)}[cfg.activation]()


def oracle(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, every rule spelled out (ltmdsl/kinds/moe.py docstring)."""
    cfg, sd = m.cfg, {k: v for k, v in m.state_dict().items()}
    E, k = cfg.experts, cfg.top_k
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t]
            logits = [float(sd["router.weight"][e] @ v) + (float(sd["router.bias"][e]) if cfg.router_bias else 0.0)
                      for e in range(E)]
            if cfg.routing == "topk_softmax":
                chosen = sorted(range(E), key=lambda e: -logits[e])[:k]
                z = sum(math.exp(logits[e]) for e in chosen)
                weights = {e: math.exp(logits[e]) / z * cfg.routed_scale for e in chosen}
            else:
                if cfg.routing.startswith("softmax"):
                    z = sum(math.exp(val) for val in logits)
                    scores = [math.exp(val) / z for val in logits]
                else:
                    scores = [1 / (1 + math.exp(-val)) for val in logits]
                choice = [s + (float(sd["selection_bias"][e]) if cfg.selection_bias else 0.0)
                          for e, s in enumerate(scores)]
                eligible = list(range(E))
                if cfg.groups > 1:
                    n = E // cfg.groups
                    def gscore(g):
                        members = sorted((choice[e] for e in range(g * n, (g + 1) * n)), reverse=True)
                        return members[0] + members[1] if cfg.group_score == "top2_sum" else members[0]
                    kept = sorted(range(cfg.groups), key=lambda g: -gscore(g))[: cfg.top_groups]
                    eligible = [e for e in range(E) if e // n in kept]
                chosen = sorted(eligible, key=lambda e: -choice[e])[:k]
                total = sum(scores[e] for e in chosen) if cfg.renormalise else 1.0
                weights = {e: scores[e] / total * cfg.routed_scale for e in chosen}
            acc = torch.zeros_like(v)
            for e, w in weights.items():
                inp = v * w if cfg.weight_input else v
                up = sd["experts.up_proj"][e] @ inp + (sd["experts.up_bias"][e] if cfg.expert_bias else 0)
                gate = None
                if cfg.gated:
                    gate = sd["experts.gate_proj"][e] @ inp + (sd["experts.gate_bias"][e] if cfg.expert_bias else 0)
                y = sd["experts.down_proj"][e] @ _act(cfg, gate, up)
                y = y + (sd["experts.down_bias"][e] if cfg.expert_bias else 0)
                acc += y if cfg.weight_input else w * y
            if cfg.shared_d_ff:
                up = sd["shared.up_proj.weight"] @ v
                gate = sd["shared.gate_proj.weight"] @ v if cfg.gated else None
                y = sd["shared.down_proj.weight"] @ _act(cfg, gate, up)
                if cfg.shared_gate:
                    y = y / (1 + math.exp(-float(sd["shared_gate.weight"][0] @ v)))
                acc += y
            out[b, t] = acc
    return out


ORACLE_CASES = {
    "deepseek-v3": dict(experts=8, top_k=2, d_ff=12, routing="sigmoid_topk_renorm", groups=4, top_groups=2,
                        selection_bias=True, routed_scale=2.5, shared_d_ff=20),
    "deepseek-v2": dict(experts=8, top_k=3, d_ff=12, routing="softmax_topk", groups=4, top_groups=2,
                        group_score="max", routed_scale=16.0, shared_d_ff=24),
    "gpt-oss": dict(experts=4, top_k=2, d_ff=12, act="swiglu_clamped", routing="topk_softmax", router_bias=True,
                    expert_bias=True, swiglu_limit=1.5, swiglu_alpha=1.702),
    "qwen3-next": dict(experts=6, top_k=2, d_ff=8, shared_d_ff=20, shared_gate=True),
    "llama4": dict(experts=4, top_k=1, d_ff=12, routing="sigmoid_topk", weight_input=True, shared_d_ff=12),
    "nemotron3-relu2": dict(experts=8, top_k=2, d_ff=12, act="relu2", routing="sigmoid_topk_renorm", groups=2,
                            top_groups=1, selection_bias=True, routed_scale=2.5, shared_d_ff=16),
    "gelu-biases": dict(experts=4, top_k=2, d_ff=12, act="gelu", expert_bias=True, router_bias=True),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_moe_variants_match_token_loop(case):
    m = ours(cfg_of(**ORACLE_CASES[case]), std=0.3)
    x = hidden(T=9)
    with torch.no_grad():
        assert_close(m(x), oracle(m, x), ORACLE_TOL, case)
        assert_close(m.step(x[:, 0]), oracle(m, x[:, :1])[:, 0], ORACLE_TOL, f"{case} step")


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_moe_variant_state_is_declared_and_counted(case):
    cfg = cfg_of(**ORACLE_CASES[case])
    m = MoE(cfg, D)
    assert sorted(m.state_dict()) == sorted(state_names(cfg))
    assert sum(p.numel() for p in m.parameters()) == MOE_KIND.count(cfg, D)


def test_selection_bias_chooses_but_does_not_weigh():
    """A large bias on one expert makes every token choose it; its weight stays its unbiased score."""
    cfg = cfg_of(experts=4, top_k=1, d_ff=8, routing="sigmoid_topk", selection_bias=True)
    m = ours(cfg, std=0.3)
    with torch.no_grad():
        m.selection_bias.zero_()
        m.selection_bias[2] = 100.0
    x = hidden(T=5)
    from ltmdsl.runtime.kinds.moe import route

    with torch.no_grad():
        logits = m.router(x.reshape(-1, D))
        w, idx = route(logits, cfg, m.selection_bias)
    assert (idx == 2).all()
    assert_close(w[:, 0], torch.sigmoid(logits[:, 2]), 1e-15, "weight is the unbiased score")


def test_swiglu_clamp_is_active_in_the_gpt_oss_case():
    """The oracle case must exercise the clamp: some gate and up values exceed the limit."""
    m = ours(cfg_of(**ORACLE_CASES["gpt-oss"]), std=0.3)
    x = hidden(T=9).reshape(-1, D)
    with torch.no_grad():
        up = torch.einsum("efd,md->emf", m.experts.up_proj, x)
    assert (up.abs() > m.cfg.swiglu_limit).any() and (up.abs() < m.cfg.swiglu_limit).any()


# ---- transformers' own blocks in float64 ---------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _load(hf, weights: dict) -> torch.nn.Module:
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=False)
    assert not unexpected, unexpected
    assert not [n for n in missing if "bias" not in n or "e_score" in n], missing  # every weight is ours
    return hf.double().eval()


def _shared(m: MoE, prefix: str) -> dict:
    return {f"{prefix}.{p}.weight": getattr(m.shared, p).weight for p in ("gate_proj", "up_proj", "down_proj")}


def test_deepseek_v3_moe_matches_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE

    m = ours(cfg_of(**ORACLE_CASES["deepseek-v3"]), std=0.3)
    hc = DeepseekV3Config(hidden_size=D, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2,
                          n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                          norm_topk_prob=True, hidden_act="silu", num_hidden_layers=1, vocab_size=16)
    hf = DeepseekV3MoE(hc)
    hf.shared_experts = type(hf.shared_experts)(hc, intermediate_size=20)  # Fs = 20: a width of its own
    ex = m.experts
    hf = _load(hf, {"gate.weight": m.router.weight, "gate.e_score_correction_bias": m.selection_bias,
                    "experts.gate_up_proj": torch.cat([ex.gate_proj, ex.up_proj], 1),
                    "experts.down_proj": ex.down_proj, **_shared(m, "shared_experts")})
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(m(x), hf(x), HF_TOL, "DeepseekV3MoE")


def test_deepseek_v2_moe_matches_transformers():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2Moe

    m = ours(cfg_of(**ORACLE_CASES["deepseek-v2"]), std=0.3)
    hc = DeepseekV2Config(hidden_size=D, moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=3,
                          n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=2,
                          routed_scaling_factor=16.0, hidden_act="silu", num_hidden_layers=1, vocab_size=16)
    hf = DeepseekV2Moe(hc)
    ex = m.experts
    hf = _load(hf, {"gate.weight": m.router.weight, "experts.gate_up_proj": torch.cat([ex.gate_proj, ex.up_proj], 1),
                    "experts.down_proj": ex.down_proj, **_shared(m, "shared_experts")})
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(m(x), hf(x), HF_TOL, "DeepseekV2Moe")


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., F] and [..., F] -> [..., 2F] with a at even and b at odd positions (gpt-oss's gate_up layout)."""
    return torch.stack([a, b], dim=-1).flatten(-2)


def test_gpt_oss_mlp_matches_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssMLP

    m = ours(cfg_of(**ORACLE_CASES["gpt-oss"]), std=0.3)
    hc = GptOssConfig(hidden_size=D, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2,
                      swiglu_limit=1.5, num_hidden_layers=1, vocab_size=16)
    hf = GptOssMLP(hc)
    ex = m.experts
    hf = _load(hf, {"router.weight": m.router.weight, "router.bias": m.router.bias,
                    "experts.gate_up_proj": _interleave(ex.gate_proj.transpose(1, 2), ex.up_proj.transpose(1, 2)),
                    "experts.gate_up_proj_bias": _interleave(ex.gate_bias, ex.up_bias),
                    "experts.down_proj": ex.down_proj.transpose(1, 2), "experts.down_proj_bias": ex.down_bias})
    assert hf.experts.alpha == m.cfg.swiglu_alpha and hf.experts.limit == m.cfg.swiglu_limit
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(m(x), hf(x)[0], HF_TOL, "GptOssMLP")


def test_qwen3_next_sparse_moe_matches_transformers():
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextConfig, Qwen3NextSparseMoeBlock

    m = ours(cfg_of(**ORACLE_CASES["qwen3-next"]), std=0.3)
    hc = Qwen3NextConfig(hidden_size=D, moe_intermediate_size=8, shared_expert_intermediate_size=20, num_experts=6,
                         num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=1, vocab_size=16)
    hf = Qwen3NextSparseMoeBlock(hc)
    ex = m.experts
    hf = _load(hf, {"gate.weight": m.router.weight, "experts.gate_up_proj": torch.cat([ex.gate_proj, ex.up_proj], 1),
                    "experts.down_proj": ex.down_proj, "shared_expert_gate.weight": m.shared_gate.weight,
                    **_shared(m, "shared_expert")})
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(m(x), hf(x), HF_TOL, "Qwen3NextSparseMoeBlock")


def test_llama4_text_moe_matches_transformers():
    from transformers.models.llama4.modeling_llama4 import Llama4TextConfig, Llama4TextMoe

    m = ours(cfg_of(**ORACLE_CASES["llama4"]), std=0.3)
    hc = Llama4TextConfig(hidden_size=D, intermediate_size=12, num_local_experts=4, num_experts_per_tok=1,
                          num_hidden_layers=1, vocab_size=16)
    hf = Llama4TextMoe(hc)
    ex = m.experts
    hf = _load(hf, {"router.weight": m.router.weight,
                    "experts.gate_up_proj": torch.cat([ex.gate_proj, ex.up_proj], 1).transpose(1, 2),
                    "experts.down_proj": ex.down_proj.transpose(1, 2), **_shared(m, "shared_expert")})
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(m(x), hf(x)[0].view_as(x), HF_TOL, "Llama4TextMoe")


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2", "gpt_oss", "qwen3_next", "llama4"])
def test_counts_equal_transformers_at_published_sizes(family):
    """transformers' block for its config class's defaults (the published model's sizes), built on the meta
    device, holds exactly the parameters our count gives for the same settings."""
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as dv2
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as dv3
    import transformers.models.gpt_oss.modeling_gpt_oss as go
    import transformers.models.llama4.modeling_llama4 as l4
    import transformers.models.qwen3_next.modeling_qwen3_next as q3n

    if family == "deepseek_v3":
        hc = dv3.DeepseekV3Config()
        block, cfg = dv3.DeepseekV3MoE, cfg_of(
            experts=hc.n_routed_experts, top_k=hc.num_experts_per_tok, d_ff=hc.moe_intermediate_size,
            routing="sigmoid_topk_renorm", groups=hc.n_group, top_groups=hc.topk_group, selection_bias=True,
            routed_scale=hc.routed_scaling_factor, shared_d_ff=hc.moe_intermediate_size * hc.n_shared_experts)
    elif family == "deepseek_v2":
        hc = dv2.DeepseekV2Config(num_experts_per_tok=6)  # its default is None
        block, cfg = dv2.DeepseekV2Moe, cfg_of(
            experts=hc.n_routed_experts, top_k=hc.num_experts_per_tok, d_ff=hc.moe_intermediate_size,
            routing="softmax_topk", routed_scale=hc.routed_scaling_factor,
            shared_d_ff=hc.moe_intermediate_size * hc.n_shared_experts)
    elif family == "gpt_oss":
        hc = go.GptOssConfig()
        block, cfg = go.GptOssMLP, cfg_of(
            experts=hc.num_local_experts, top_k=hc.num_experts_per_tok, d_ff=hc.intermediate_size,
            act="swiglu_clamped", routing="topk_softmax", router_bias=True, expert_bias=True)
    elif family == "qwen3_next":
        hc = q3n.Qwen3NextConfig()
        block, cfg = q3n.Qwen3NextSparseMoeBlock, cfg_of(
            experts=hc.num_experts, top_k=hc.num_experts_per_tok, d_ff=hc.moe_intermediate_size,
            shared_d_ff=hc.shared_expert_intermediate_size, shared_gate=True)
    else:
        hc = l4.Llama4TextConfig()
        block, cfg = l4.Llama4TextMoe, cfg_of(
            experts=hc.num_local_experts, top_k=hc.num_experts_per_tok, d_ff=hc.intermediate_size,
            routing="sigmoid_topk", weight_input=True, shared_d_ff=hc.intermediate_size)
    with torch.device("meta"):
        hf = block(hc)
    assert MOE_KIND.count(cfg, hc.hidden_size) == sum(p.numel() for p in hf.parameters())
    assert cfg.experts > cfg.top_k  # a real sparse block: some parameters are inactive


QWEN2_MOE = """
model qwen2_moe_tiny {
    vocab = 48
    d_model = 32
    dtype = fp32
    norm = rmsnorm(eps = 1e-6)
    layer attn = attention(heads = 4, kv_heads = 2, qkv_bias = true)
    layer dense = mlp(d_ff = 40)
    layer moe = moe(experts = 6, top_k = 2, d_ff = 12, routing = softmax_topk, shared_d_ff = 20, shared_gate = true)
    stack { attn dense repeat 2 { attn moe } }
}
"""


def test_qwen2_moe_model_with_a_dense_first_layer_matches_transformers():
    """A whole model: a dense first layer (mlp_only_layers, like DeepSeek's first_k_dense_replace), then
    shared-expert MoE layers, against Qwen2MoeForCausalLM in float64 (its RMSNorms normalise in fp32)."""
    import ltmdsl
    from ltmdsl.runtime.build import build
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    m = build(ltmdsl.loads(QWEN2_MOE), seed=0).double().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in m.named_parameters():  # norm weights around 1, everything else around 0
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64) + (1.0 if "norm" in name else 0.0))
    hc = Qwen2MoeConfig(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12,
                        shared_expert_intermediate_size=20, norm_topk_prob=False, mlp_only_layers=[0],
                        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="eager",
                        experts_implementation="eager")  # the per-expert loop (grouped_mm has no float64)
    hf = Qwen2MoeForCausalLM(hc)
    w = {"model.embed_tokens.weight": m.embed.weight, "model.norm.weight": m.final_norm.weight,
         "lm_head.weight": m.lm_head.weight}
    for j in range(3):
        a, f = m.layers[2 * j], m.layers[2 * j + 1]
        p = f"model.layers.{j}."
        w[p + "input_layernorm.weight"] = a.norm.weight
        w[p + "post_attention_layernorm.weight"] = f.norm.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[p + f"self_attn.{n}.weight"] = getattr(a.mixer, n).weight
            if n != "o_proj":
                w[p + f"self_attn.{n}.bias"] = getattr(a.mixer, n).bias
        if j == 0:
            w.update({p + f"mlp.{n}.weight": getattr(f.mixer, n).weight for n in ("gate_proj", "up_proj", "down_proj")})
        else:
            ex = f.mixer.experts
            w.update({p + "mlp.gate.weight": f.mixer.router.weight,
                      p + "mlp.experts.gate_up_proj": torch.cat([ex.gate_proj, ex.up_proj], 1),
                      p + "mlp.experts.down_proj": ex.down_proj,
                      p + "mlp.shared_expert_gate.weight": f.mixer.shared_gate.weight,
                      **{p + f"mlp.shared_expert.{n}.weight": getattr(f.mixer.shared, n).weight
                         for n in ("gate_proj", "up_proj", "down_proj")}})
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in w.items()}, strict=False)
    assert not unexpected and not [n for n in missing if "rotary" not in n], (missing, unexpected)
    hf = hf.double().eval()
    assert sum(p.numel() for p in hf.parameters()) == m.ir.params_total
    ids = torch.tensor([[3, 17, 5, 40, 9, 22, 31, 0, 12, 47, 8]])
    with torch.no_grad():
        assert_close(m(ids), hf(ids).logits, HF_TOL, "Qwen2MoeForCausalLM")


def test_nemotron_h_moe_matches_transformers():
    """Nemotron-3's MoE: relu2 experts (up and down only), sigmoid scores with a selection bias in groups,
    renormalised and scaled, plus a relu2 shared expert (NemotronHMoE, no latent projection)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    m = ours(cfg_of(**ORACLE_CASES["nemotron3-relu2"]), std=0.3)
    hc = NemotronHConfig(hidden_size=D, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=12,
                         moe_shared_expert_intermediate_size=16, n_group=2, topk_group=1, norm_topk_prob=True,
                         routed_scaling_factor=2.5, mlp_hidden_act="relu2", vocab_size=16)
    hf = _load(NemotronHMoE(hc), {"gate.weight": m.router.weight, "gate.e_score_correction_bias": m.selection_bias,
                                  "experts.up_proj": m.experts.up_proj, "experts.down_proj": m.experts.down_proj,
                                  "shared_experts.up_proj.weight": m.shared.up_proj.weight,
                                  "shared_experts.down_proj.weight": m.shared.down_proj.weight})
    assert sum(p.numel() for p in hf.parameters()) == MOE_KIND.count(m.cfg, D)
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(m(x), hf(x), HF_TOL, "NemotronHMoE")


def test_granite_moe_hybrid_matches_transformers():
    """Granite-4.0-H's FFN: block_sparse_moe (softmax over the top-k logits) plus shared_mlp, summed in its
    decoder layer; the shared MLP keeps gate and up in one input_linear [2Fs, d] (gate first)."""
    from transformers import GraniteMoeHybridConfig
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMLP, GraniteMoeHybridMoE

    m = ours(cfg_of(experts=6, top_k=2, d_ff=12, routing="topk_softmax", shared_d_ff=20), std=0.3)
    hc = GraniteMoeHybridConfig(hidden_size=D, num_local_experts=6, num_experts_per_tok=2, intermediate_size=12,
                                shared_intermediate_size=20, vocab_size=16, mamba_n_heads=4,
                                mamba_d_head=16)  # mamba sizes only to pass its config checks
    ex, sh = m.experts, m.shared
    moe = _load(GraniteMoeHybridMoE(hc), {"router.weight": m.router.weight,
                                          "experts.gate_up_proj": torch.cat([ex.gate_proj, ex.up_proj], 1),
                                          "experts.down_proj": ex.down_proj})
    shared = _load(GraniteMoeHybridMLP(hc), {"input_linear.weight": torch.cat([sh.gate_proj.weight, sh.up_proj.weight]),
                                             "output_linear.weight": sh.down_proj.weight})
    assert sum(p.numel() for p in (*moe.parameters(), *shared.parameters())) == MOE_KIND.count(m.cfg, D)
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(m(x), moe(x) + shared(x), HF_TOL, "GraniteMoeHybridMoE + shared_mlp")


def test_kimi_linear_moe_matches_transformers():
    """Kimi-Linear's MoE routes as DeepSeek-V3 (sigmoid, selection bias, groups, renorm, 2.446 scaling) with
    shared experts of n_shared * moe_intermediate_size."""
    from transformers import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearMoE

    cfg = cfg_of(experts=8, top_k=2, d_ff=12, routing="sigmoid_topk_renorm", groups=4, top_groups=2,
                 selection_bias=True, routed_scale=2.446, shared_d_ff=24)
    m = ours(cfg, std=0.3)
    hc = KimiLinearConfig(hidden_size=D, num_experts=8, num_experts_per_token=2, moe_intermediate_size=12,
                          num_shared_experts=2, num_expert_group=4, topk_group=2, moe_renormalize=True,
                          routed_scaling_factor=2.446, vocab_size=16, num_hidden_layers=1)
    ex = m.experts
    hf = _load(KimiLinearMoE(hc), {"gate.weight": m.router.weight, "gate.e_score_correction_bias": m.selection_bias,
                                   "experts.gate_up_proj": torch.cat([ex.gate_proj, ex.up_proj], 1),
                                   "experts.down_proj": ex.down_proj, **_shared(m, "shared_experts")})
    assert sum(p.numel() for p in hf.parameters()) == MOE_KIND.count(cfg, D)
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(m(x), hf(x), HF_TOL, "KimiLinearMoE")
