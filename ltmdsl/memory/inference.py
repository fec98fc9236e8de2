"""Inference memory per sub-layer: KV cache, recurrent state, prefill workspace, logits, weights.

Per GPU with tensor parallelism t, context parallelism c and data parallelism dp (b = ceil(B/dp) sequences
per GPU); every formula below is per sub-layer and in bytes.

KV cache (attention), as `model.new_cache` allocates it (CONTRACTS.md):
    b * ceil(Hkv/t) * (D + Dv) * min(T, W) / c * kv_bytes
  Hkv*(D + Dv) rather than 2*Hkv*D so that Dv != D is exact; W = T for global attention (no Min);
  a KV head is replicated when t > Hkv, hence the ceiling. fp8 KV is a 1-byte kv dtype.

Recurrent state (one per sequence, constant in T), state dtype from the budget (default: model dtype):
    Mamba-1   conv  b * Di/t * taps * s_bytes      SSM  b * Di/t * N * s_bytes
    Mamba-2   conv  b * (Di + 2GN)/t * taps * s_bytes   SSM  b * Hs/t * P * N * s_bytes
  taps = K ("full": state-spaces/mamba and Megatron keep the whole window) or K - 1 ("minus_one":
  vLLM keeps only the past inputs).

Prefill workspace (`activations`): the transient tensors of one sub-layer while a chunk of
Cc = min(C, T) tokens is processed (a = activation bytes). Layers run one after another and free
their workspace, so the stack needs the residual stream plus the *largest* sub-layer workspace:
    residual   2 * a * b * Cc/c * d                       (x and norm(x))
    attention  a * b * Cc/c * (H*D + Hkv*D + Hkv*Dv + H*Dv)/t + 4 * b * Cc/c * H/t   (q, k, v, out, lse)
               without flash attention add the scores: (a + 4) * b * H/t * Cc/c * min(T, W)
               (a-dtype scores and their fp32 softmax, as eager attention upcasts)
    mlp        a * b * Cc/c * F * (3 if gated else 2)/t   (gate, up, product | up, activation)
    moe        a * b * Cc/c * k * (2d + F*(3|2)/t) + 4 * b * Cc/c * E   (dispatch + expert MLPs + fp32 router)
    mamba      a * b * Cc/c * (5 Di/t + R + 2N)          (xz, conv out, delta, y; x_proj output)
    mamba2     a * b * Cc/c * (4 Di + 4GN + Hs)/t + 4 * b * Hs/t * P * N * ceil(Cc/chunk_ssd)
               (zxbcdt, conv out, y; fp32 chunk states of the SSD scan)

Logits: fp32 logits of the last position of each sequence, 4 * b * V / t (sampling needs no more).
Weights: params * weight_bytes / t (expert weights / (t * ep)); embeddings are vocab-parallel.
"""

from __future__ import annotations

import sympy

from ltmdsl.ir import (
    AttentionConfig,
    Dtype,
    Mamba2Config,
    MambaConfig,
    MLPConfig,
    ModelIR,
    MoEConfig,
)
from ltmdsl.memory.settings import Settings
from ltmdsl.memory.symbols import B, C, T, cdiv, ceil_bytes, compile_exact, per_replica

R = sympy.Rational


def conv_taps(d_conv: int, convention: str) -> int:
    """Conv taps kept per channel: K ("full") or K - 1 ("minus_one")."""
    return d_conv if convention == "full" else d_conv - 1


def tokens_held(m: AttentionConfig):
    """Tokens an attention layer keeps in its cache at context T: min(T, W), or T when global."""
    return T if m.window is None else sympy.Min(T, m.window)


def kv_cache(m: AttentionConfig, s: Settings):
    """KV bytes of one attention sub-layer on one GPU (see the module docstring)."""
    b = per_replica(B, s.dp)
    return b * cdiv(m.kv_heads, s.tp) * (m.head_dim + m.v_head_dim) * tokens_held(m) / R(s.cp) \
        * s.kv_dtype.bytes


def recurrent_state(m, s: Settings) -> dict[str, sympy.Expr]:
    """{"conv": bytes, "ssm": bytes} of one Mamba or Mamba-2 sub-layer on one GPU; {} otherwise."""
    b = per_replica(B, s.dp)
    sb = s.state_dtype.bytes
    if isinstance(m, MambaConfig):
        di = R(m.d_inner, s.tp)
        return {"conv": b * di * conv_taps(m.d_conv, s.conv_taps) * sb, "ssm": b * di * m.d_state * sb}
    if isinstance(m, Mamba2Config):
        return {"conv": b * R(m.conv_dim, s.tp) * conv_taps(m.d_conv, s.conv_taps) * sb,
                "ssm": b * R(m.heads, s.tp) * m.head_dim * m.d_state * sb}
    return {}


def _ffn_width(activation: str, d_ff: int) -> int:
    """Elements per token that an MLP keeps: gate, up and product when gated; up and act otherwise."""
    return (3 if activation in ("swiglu", "geglu") else 2) * d_ff


def prefill_workspace(m, model: ModelIR, s: Settings):
    """Transient bytes of one sub-layer while a chunk min(C, T) is prefilled (module docstring)."""
    a = s.activation_dtype.bytes
    tok = per_replica(B, s.dp) * sympy.Min(C, T) / R(s.cp)  # b * Cc / c
    t = R(s.tp)
    d = model.d_model
    if isinstance(m, AttentionConfig):
        qkvo = m.heads * m.head_dim + m.kv_heads * (m.head_dim + m.v_head_dim) + m.heads * m.v_head_dim
        out = a * tok * qkvo / t + 4 * tok * m.heads / t
        if not s.flash_attention:
            out += (a + 4) * tok * m.heads / t * tokens_held(m)
        return out
    if isinstance(m, MLPConfig):
        return a * tok * _ffn_width(m.activation, m.d_ff) / t
    if isinstance(m, MoEConfig):
        return a * tok * m.top_k * (2 * d + _ffn_width(m.activation, m.d_ff) / t) + 4 * tok * m.experts
    if isinstance(m, MambaConfig):
        return a * tok * (5 * m.d_inner / t + m.dt_rank + 2 * m.d_state)
    if isinstance(m, Mamba2Config):
        zxbcdt = 2 * m.d_inner + 2 * m.n_groups * m.d_state + m.heads
        chunks = sympy.ceiling(sympy.Min(C, T) / m.chunk)
        return a * tok * (zxbcdt + m.conv_dim + m.d_inner) / t \
            + 4 * per_replica(B, s.dp) * m.heads / t * m.head_dim * m.d_state * chunks
    raise TypeError(f"unknown mixer {type(m).__name__}")


def residual_workspace(model: ModelIR, s: Settings):
    """The residual stream and its normalised copy for one chunk: 2 * a * b * Cc/c * d."""
    return 2 * s.activation_dtype.bytes * per_replica(B, s.dp) * sympy.Min(C, T) / R(s.cp) * model.d_model


def logits(model: ModelIR, s: Settings):
    """fp32 logits of the last position of each sequence on one GPU: 4 * b * V / t."""
    return 4 * per_replica(B, s.dp) * model.vocab / R(s.tp)


def cache_bytes(model: ModelIR, *, batch: int, context: int, kv_dtype: Dtype, state_dtype: Dtype,
                conv_taps: str = "full") -> dict[str, int]:
    """Exactly what `model.new_cache(batch, context, ...)` allocates (CONTRACTS.md), in bytes.

    {"kv_cache": sum over attention sub-layers of B*Hkv*(D+Dv)*min(T,W)*kv_bytes,
     "recurrent_state": sum over Mamba sub-layers of conv + SSM state}. Tied sub-layers share weights,
    not caches, so every sub-layer counts.
    """
    from ltmdsl.memory.settings import resolve

    s = resolve(model, None, batch=batch, context=context, kv_dtype=kv_dtype, state_dtype=state_dtype,
                conv_taps=conv_taps)
    kv = sympy.Integer(0)
    state = sympy.Integer(0)
    counts: dict = {}
    for layer in model.layers:
        counts[layer.mixer] = counts.get(layer.mixer, 0) + 1
    for m, n in counts.items():
        if isinstance(m, AttentionConfig):
            kv += n * kv_cache(m, s)
        state += n * sum(recurrent_state(m, s).values(), sympy.Integer(0))
    return {"kv_cache": ceil_bytes(compile_exact(kv)(context, batch, 1)),
            "recurrent_state": ceil_bytes(compile_exact(state)(context, batch, 1))}


def weights_bytes(model: ModelIR, dtype: Dtype | str) -> int:
    """params_total * dtype.bytes (tied weights counted once)."""
    from ltmdsl.memory.settings import as_dtype

    return model.params_total * as_dtype(dtype).bytes
