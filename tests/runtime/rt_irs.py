"""Hand-built ModelIRs for the runtime tests (independent of the parser), plus the spec examples.

`mixer_ir(...)` wraps mixers into a tiny model; `tiny_hybrid_ir()` mirrors examples/tiny-hybrid.ltm (every
mixer kind: global attention, a window of 16, Mamba-1, Mamba-2, MLP and MoE).
"""

from __future__ import annotations

from ltmdsl.ir import Dtype, ModelIR, NormConfig, SourcePos, SubLayer
from ltmdsl.kinds import count_params
from ltmdsl.kinds.attention import AttentionConfig
from ltmdsl.kinds.mamba import MambaConfig
from ltmdsl.kinds.mamba2 import Mamba2Config
from ltmdsl.kinds.mlp import MLPConfig
from ltmdsl.kinds.moe import MoEConfig

POS = SourcePos("<runtime-test>", 1, 1)
FP32 = Dtype("fp32", 4)
RMS = NormConfig("rmsnorm", 1e-5)


def attention(heads=4, kv_heads=2, head_dim=8, v_head_dim=None, window=None, rope_theta=10000.0, causal=True,
              qkv_bias=False, out_bias=False, qk_norm=False, rope_scaling=None, rope_dim=None) -> AttentionConfig:
    return AttentionConfig(heads, kv_heads, head_dim, v_head_dim or head_dim, window, rope_theta, causal,
                           qkv_bias, out_bias, qk_norm, rope_scaling, rope_dim)


def mamba(d_model=32, d_state=8, d_conv=4, expand=2, dt_rank=None, conv_bias=True, proj_bias=False,
          inner_norms=False) -> MambaConfig:
    return MambaConfig(d_state, d_conv, expand, expand * d_model, dt_rank or -(-d_model // 16), conv_bias,
                       proj_bias, inner_norms)


def mamba2(d_model=32, d_state=16, head_dim=16, n_groups=1, expand=2, d_conv=4, chunk=16, conv_bias=True,
           proj_bias=False) -> Mamba2Config:
    d_inner = expand * d_model
    return Mamba2Config(d_state, head_dim, d_inner // head_dim, n_groups, expand, d_inner, d_conv, chunk,
                        conv_bias, proj_bias)


def mlp(d_ff=64, act="swiglu", bias=False) -> MLPConfig:
    return MLPConfig(d_ff, act, bias)


def moe(experts=4, top_k=2, d_ff=32, act="swiglu", routing="softmax_topk_renorm") -> MoEConfig:
    return MoEConfig(experts, top_k, d_ff, act, routing)


def mixer_ir(mixers, *, vocab=64, d_model=32, norm=RMS, tie_embeddings=False, name="rt_test",
             ties=None) -> ModelIR:
    """A model whose stack is `mixers` in order; `ties[i] = (group, slot)` ties sub-layer i."""
    layers = []
    for i, m in enumerate(mixers):
        group, slot = (ties or {}).get(i, (None, None))
        params = count_params(m, d_model) + norm.params_per_channel * d_model
        layers.append(SubLayer(i, f"{m.kind}{i}", norm, m, params, POS, group, slot))
    return ModelIR(name, vocab, d_model, FP32, norm, tie_embeddings, tuple(layers), POS, "0" * 64, "")


def tiny_hybrid_ir() -> ModelIR:
    """Like examples/tiny-hybrid.ltm: ssm1 ffn ssm2 moe swa ffn attn ffn at d = 64, V = 256."""
    d = 64
    ffn = mlp(d_ff=128)
    stack = [
        mamba(d_model=d, d_state=8), ffn, mamba2(d_model=d, d_state=16, head_dim=16, chunk=16),
        moe(experts=4, top_k=2, d_ff=64), attention(heads=4, kv_heads=1, head_dim=16, window=16), ffn,
        attention(heads=4, kv_heads=2, head_dim=16), ffn,
    ]
    return mixer_ir(stack, vocab=256, d_model=d, name="tiny_hybrid")
