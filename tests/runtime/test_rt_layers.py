"""Each layer against a float64 oracle: transformers' own modules (MambaMixer, JambaMambaMixer,
Mamba2Mixer, LlamaAttention / Qwen3Attention / Mistral-style windows / Llama 3.1's llama3 rope scaling,
BambaAttention's partial rotary embeddings, Mixtral and Jamba MoE blocks) run
in fp64 with our weights, plus hand-written formulas for the MLP activations and the attention window.
Tolerances: 1e-10 relative against our own formulas (fp64 both sides); HF_TOL = 1e-6 against transformers,
which casts A_log, D and the dt bias to fp32 even in a float64 module.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, rel_err
from rt_irs import attention, mamba, mamba2, mlp, moe

from ltmdsl.ir import RopeScaling
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds.attention import Attention
from ltmdsl.runtime.kinds.mamba import Mamba
from ltmdsl.runtime.kinds.mamba2 import Mamba2
from ltmdsl.runtime.kinds.mlp import MLP
from ltmdsl.runtime.kinds.moe import MoE

transformers = pytest.importorskip("transformers")
F64 = torch.float64
D_MODEL = 32
EPS = 1e-5
HF_TOL = 1e-6


def ours(module):
    module.init_weights(torch.Generator().manual_seed(0))
    return module.double().eval()


def hidden(T=37, B=2, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=F64)


def perturb(module, seed=3):
    """Move norm weights and biases off their init values so the comparison covers them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name or name == "D":
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---- Mamba-1 and Jamba ---------------------------------------------------------------------


@pytest.mark.parametrize("inner_norms", [False, True], ids=["mamba", "jamba-inner-norms"])
def test_mamba_matches_transformers(inner_norms):
    cfg = mamba(d_model=D_MODEL, d_state=8, dt_rank=4, inner_norms=inner_norms)
    layer = ours(Mamba(cfg, D_MODEL, EPS, TORCH_KERNELS))
    perturb(layer)
    if inner_norms:
        from transformers.models.jamba.modeling_jamba import JambaConfig, JambaMambaMixer

        hc = JambaConfig(hidden_size=D_MODEL, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                         mamba_conv_bias=True, mamba_proj_bias=False, rms_norm_eps=EPS, num_hidden_layers=1,
                         attn_layer_period=2, attn_layer_offset=1, vocab_size=16)
        hf = JambaMambaMixer(hc, layer_idx=0)
    else:
        from transformers.models.mamba.modeling_mamba import MambaConfig, MambaMixer

        hc = MambaConfig(hidden_size=D_MODEL, state_size=8, conv_kernel=4, expand=2, time_step_rank=4,
                         use_conv_bias=True, use_bias=False, num_hidden_layers=1, vocab_size=16)
        hf = MambaMixer(hc, layer_idx=0)
    hf = hf.double().eval()
    hf.load_state_dict(layer.state_dict())
    x = hidden()
    with torch.no_grad():
        assert_close(layer(x), hf(x), HF_TOL, "mamba vs transformers")


def test_mamba2_matches_transformers():
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Config, Mamba2Mixer

    cfg = mamba2(d_model=D_MODEL, d_state=16, head_dim=8, n_groups=2, chunk=8)
    layer = ours(Mamba2(cfg, D_MODEL, EPS, TORCH_KERNELS))
    perturb(layer)
    hc = Mamba2Config(hidden_size=D_MODEL, state_size=16, head_dim=8, num_heads=cfg.heads, n_groups=2, expand=2,
                      conv_kernel=4, chunk_size=8, use_conv_bias=True, use_bias=False, layer_norm_epsilon=EPS,
                      num_hidden_layers=1, vocab_size=16)
    hf = Mamba2Mixer(hc, layer_idx=0).double().eval()
    hf.load_state_dict(layer.state_dict())
    x = hidden(T=37)
    with torch.no_grad():
        assert_close(layer(x), hf(x), HF_TOL, "mamba2 vs transformers")


# ---- attention ------------------------------------------------------------------------------


def hf_attention(cfg, qk_norm: bool):
    if qk_norm:
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as Cls
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Config as Conf
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rope
    else:
        from transformers.models.llama.modeling_llama import LlamaAttention as Cls
        from transformers.models.llama.modeling_llama import LlamaConfig as Conf
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as Rope
    rope = {"max_position_embeddings": 256}
    if cfg.rope_scaling is not None:  # transformers 5's rope_parameters form of Llama 3.1's scaling
        s = cfg.rope_scaling
        rope = dict(max_position_embeddings=max(256, 2 * s.original_context),
                    rope_parameters=dict(rope_type=s.kind, rope_theta=cfg.rope_theta, factor=s.factor,
                                         low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                                         original_max_position_embeddings=s.original_context))
    hc = Conf(hidden_size=D_MODEL, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, attention_bias=cfg.qkv_bias, rms_norm_eps=EPS,
              num_hidden_layers=1, vocab_size=16, **rope)
    hc._attn_implementation = "eager"
    return Cls(hc, layer_idx=0).double().eval(), Rope(hc).double()


def additive_mask(T, window):
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = j <= i
    if window is not None:
        ok &= j > i - window
    return torch.zeros(T, T, dtype=F64).masked_fill(~ok, float("-inf"))[None, None]


@pytest.mark.parametrize(
    "heads,kv_heads,window,qk_norm,bias",
    [(4, 4, None, False, False), (4, 2, None, False, True), (4, 1, 8, False, False), (4, 2, 5, True, False)],
    ids=["mha-llama", "gqa-bias", "mqa-window8", "gqa-window5-qwen3-qknorm"],
)
@pytest.mark.parametrize("kernels", [TORCH_KERNELS, REFERENCE_KERNELS], ids=["sdpa", "reference"])
def test_attention_matches_transformers(heads, kv_heads, window, qk_norm, bias, kernels):
    cfg = attention(heads=heads, kv_heads=kv_heads, head_dim=8, window=window, qk_norm=qk_norm, qkv_bias=bias,
                    out_bias=bias)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    perturb(layer)
    hf, rope = hf_attention(cfg, qk_norm)
    hf.load_state_dict(layer.state_dict())
    T = 29
    x = hidden(T=T)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=rope(x, pos), attention_mask=additive_mask(T, window))
        assert_close(layer(x), ref, HF_TOL, "attention vs transformers")


#: Llama 3.1's rope scaling at toy sizes: with head_dim 8 and theta 100 the wavelengths are 6.3, 19.9, 62.8
#: and 199 tokens; ctx 16 with factors 0.5 and 2 (thresholds 32 and 8) puts them in the high, medium, low
#: and low band, so every branch of the adjustment is exercised, and 40 tokens run past ctx.
LLAMA3_TOY = RopeScaling("llama3", factor=4.0, low_freq_factor=0.5, high_freq_factor=2.0, original_context=16)


@pytest.mark.parametrize("kernels", [TORCH_KERNELS, REFERENCE_KERNELS], ids=["sdpa", "reference"])
def test_attention_llama3_rope_scaling_matches_transformers(kernels):
    """LlamaAttention + LlamaRotaryEmbedding with rope_type llama3 in fp64, 40 tokens, HF_TOL (transformers
    computes the rotation angles in fp32 even in a float64 module; we use fp64 there). The frequencies
    themselves equal transformers' `_compute_llama3_parameters` bit for bit in fp32, for the toy and the
    published Llama 3.1 setting, and the scaling visibly changes the output."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ltmdsl.runtime.ops_attention import rope_inv_freq

    cfg = attention(heads=4, kv_heads=2, head_dim=8, rope_theta=100.0, rope_scaling=LLAMA3_TOY)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    perturb(layer)
    hf, rope = hf_attention(cfg, qk_norm=False)
    hf.load_state_dict(layer.state_dict())
    T = 40
    x = hidden(T=T)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=rope(x, torch.arange(T)[None]), attention_mask=additive_mask(T, None))
        got = layer(x)
        print(f"llama3 attention vs transformers: relative error {rel_err(got, ref):.2e}")
        assert_close(got, ref, HF_TOL, "llama3-scaled attention vs transformers")
        plain = ours(Attention(attention(heads=4, kv_heads=2, head_dim=8, rope_theta=100.0), D_MODEL, EPS, kernels))
        perturb(plain)
        assert rel_err(plain(x), got) > 1000 * HF_TOL, "the scaling must matter far beyond the tolerance"
    for c in (cfg, attention(heads=32, kv_heads=8, head_dim=128, rope_theta=5e5,
                             rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))):
        hc = hf_attention(c, qk_norm=False)[0].config
        want, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hc)
        assert attention_factor == 1.0
        assert torch.equal(rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, torch.float32), want)


def hf_bamba_attention(cfg):
    """transformers' BambaAttention + BambaRotaryEmbedding (fp64, eager) for an attention IR with rope_dim R:
    partial_rotary_factor R / D in transformers 5's rope_parameters, with the IR's llama3 scaling if any."""
    from transformers.models.bamba.modeling_bamba import BambaAttention, BambaConfig, BambaRotaryEmbedding

    rope = dict(rope_type="default", rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.rotary_dim / cfg.head_dim)
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope.update(rope_type=s.kind, factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_context)
    hc = BambaConfig(hidden_size=D_MODEL, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, rope_parameters=rope, num_hidden_layers=1,
                     vocab_size=16, mamba_n_heads=8, max_position_embeddings=256)
    hc._attn_implementation = "eager"
    return BambaAttention(hc, layer_idx=0).double().eval(), BambaRotaryEmbedding(hc).double()


@pytest.mark.parametrize("rope_dim, scaling", [(6, None), (2, None), (4, LLAMA3_TOY)],
                         ids=["half-of-12", "2-of-12", "third-of-12-llama3"])
@pytest.mark.parametrize("kernels", [TORCH_KERNELS, REFERENCE_KERNELS], ids=["sdpa", "reference"])
def test_partial_rope_attention_matches_bamba_with_cache(rope_dim, scaling, kernels):
    """Bamba's partial rotary embeddings (only the first rope_dim of head_dim 12 channels rotate; 6 = Bamba's
    partial_rotary_factor 0.5, with 3 frequency pairs; with llama3 scaling too) against BambaAttention in fp64
    over 40 tokens, HF_TOL: the whole sequence at once, then a 17-token prefill + a 9-token chunk + 14 one-token
    decode steps through our KV cache, which must give the same outputs (and ours without the cache to 1e-12).
    The rope_dim matters far beyond the tolerance (the whole-head rotation differs)."""
    from ltmdsl.runtime.kinds.attention import KVCache

    cfg = attention(heads=4, kv_heads=2, head_dim=12, rope_theta=100.0, rope_scaling=scaling, rope_dim=rope_dim,
                    qkv_bias=True, out_bias=True)
    layer = ours(Attention(cfg, D_MODEL, EPS, kernels))
    perturb(layer)
    hf, rope = hf_bamba_attention(cfg)
    hf.load_state_dict(layer.state_dict())
    T = 40
    x = hidden(T=T)
    with torch.no_grad():
        ref, _ = hf(x, position_embeddings=rope(x, torch.arange(T)[None]), attention_mask=additive_mask(T, None))
        got = layer(x)
        print(f"rope_dim {rope_dim} of 12 vs BambaAttention: relative error {rel_err(got, ref):.2e}")
        assert_close(got, ref, HF_TOL, "partial-rope attention vs BambaAttention")
        state = KVCache(torch.zeros(2, T, 2, 12, dtype=F64), torch.zeros(2, T, 2, 12, dtype=F64), None)
        parts = [layer(x[:, :17], state, 0), layer(x[:, 17:26], state, 17)]
        parts += [layer.step(x[:, t], state, t)[:, None] for t in range(26, T)]
        cached = torch.cat(parts, dim=1)  # [B, T, d]
        print(f"rope_dim {rope_dim}, prefill + chunk + decode: relative error {rel_err(cached, ref):.2e}")
        assert_close(cached, ref, HF_TOL, "partial-rope attention through the cache vs BambaAttention")
        assert_close(cached, got, 1e-12, "partial-rope attention through the cache vs without it")
        whole = ours(Attention(attention(heads=4, kv_heads=2, head_dim=12, rope_theta=100.0, rope_scaling=scaling,
                                         qkv_bias=True, out_bias=True), D_MODEL, EPS, kernels))
        whole.load_state_dict(layer.state_dict())
        assert rel_err(whole(x), got) > 1000 * HF_TOL, "rotating the whole head must differ"


def test_attention_rejects_a_bad_rope_dim_built_by_hand():
    """IRs built without the front end are checked too: rope_dim must be even and fit in the head."""
    for bad in (3, 0, 10):
        with pytest.raises(ValueError, match="rope_dim must be even and in \\[2, head_dim = 8\\]"):
            Attention(attention(head_dim=8, rope_dim=bad), D_MODEL, EPS, TORCH_KERNELS)


def test_attention_without_rope_is_position_free_for_noncausal():
    """rope_theta = none and causal = false: permuting tokens permutes outputs."""
    cfg = attention(heads=2, kv_heads=1, head_dim=8, rope_theta=None, causal=False)
    layer = ours(Attention(cfg, D_MODEL, EPS, TORCH_KERNELS))
    x = hidden(T=9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(layer(x[:, perm]), layer(x)[:, perm], 1e-12, "permutation equivariance")


# ---- feed-forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["swiglu", "geglu", "geglu_tanh", "gelu", "relu2", "relu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_mlp_formula(act, bias):
    layer = ours(MLP(mlp(d_ff=48, act=act, bias=bias), D_MODEL))
    perturb(layer)
    x = hidden(T=5)
    up = F.linear(x, layer.up_proj.weight, layer.up_proj.bias)
    gate = F.linear(x, layer.gate_proj.weight, layer.gate_proj.bias) if layer.gate_proj is not None else None
    tanh_gelu = 0.5 * gate * (1 + torch.tanh((2 / math.pi) ** 0.5 * (gate + 0.044715 * gate ** 3))) \
        if gate is not None else None  # GELU's tanh approximation written out (Hendrycks & Gimpel 2016)
    h = {"swiglu": lambda: F.silu(gate) * up, "geglu": lambda: F.gelu(gate) * up, "geglu_tanh": lambda: tanh_gelu * up,
         "gelu": lambda: F.gelu(up),
         "relu2": lambda: F.relu(up) ** 2, "relu": lambda: F.relu(up)}[act]()
    with torch.no_grad():
        assert_close(layer(x), F.linear(h, layer.down_proj.weight, layer.down_proj.bias), 1e-12, act)
    assert (layer.gate_proj is not None) == (act in ("swiglu", "geglu", "geglu_tanh"))


@pytest.mark.parametrize("routing", ["softmax_topk_renorm", "softmax_topk"], ids=["mixtral", "jamba"])
def test_moe_matches_transformers(routing):
    cfg = moe(experts=4, top_k=2, d_ff=24, routing=routing)
    layer = ours(MoE(cfg, D_MODEL))
    if routing == "softmax_topk_renorm":
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

        hc = MixtralConfig(hidden_size=D_MODEL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                           num_hidden_layers=1, vocab_size=16)
        hf = MixtralSparseMoeBlock(hc)
        router_name = "gate.weight"
    else:
        from transformers.models.jamba.modeling_jamba import JambaConfig, JambaSparseMoeBlock

        hc = JambaConfig(hidden_size=D_MODEL, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                         num_hidden_layers=1, vocab_size=16)
        hf = JambaSparseMoeBlock(hc)
        router_name = "router.weight"
    ex = layer.experts
    hf.load_state_dict({
        router_name: layer.router.weight,
        "experts.gate_up_proj": torch.cat([ex.gate_proj, ex.up_proj], dim=1),
        "experts.down_proj": ex.down_proj,
    })
    hf = hf.double().eval()
    x = hidden(T=23)
    with torch.no_grad():
        assert_close(layer(x), hf(x), HF_TOL, f"moe {routing}")


def test_moe_topk_softmax_equals_mixtral_routing():
    a = ours(MoE(moe(routing="topk_softmax"), D_MODEL))
    b = ours(MoE(moe(routing="softmax_topk_renorm"), D_MODEL))
    x = hidden(T=11)
    with torch.no_grad():
        assert_close(a(x), b(x), 1e-12, "topk_softmax == softmax_topk_renorm")


def test_moe_jamba_weights_do_not_sum_to_one():
    """Jamba keeps the raw top-k softmax mass: outputs differ from Mixtral's renormalised ones."""
    a = ours(MoE(moe(routing="softmax_topk"), D_MODEL))
    b = ours(MoE(moe(routing="softmax_topk_renorm"), D_MODEL))
    x = hidden(T=11)
    with torch.no_grad():
        ratio = (a(x).norm() / b(x).norm()).item()
    assert ratio < 0.99


@pytest.mark.parametrize("act", ["swiglu", "geglu", "geglu_tanh", "gelu", "relu2", "relu"])
def test_mlp_inference_path_computes_in_place_to_the_same_values(act):
    """Without autograd the MLP computes act(gate) and the product in place (`hidden_inplace`): the same float64
    values as the autograd path (bitwise: the same elementwise operations), and its input is left untouched."""
    from ltmdsl.runtime.kinds.mlp import MLP

    torch.manual_seed(0)
    m = MLP(mlp(24, act), 8).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = x.clone()
    with_grad = m(x)
    with torch.no_grad():
        without = m(x)
    assert torch.equal(without, with_grad.detach()), act
    assert torch.equal(x, keep)
