"""Softmax attention (MHA, GQA, MQA; global or sliding-window): its IR config and every pure facet.

KV cache, as the runtime allocates it (docs/CONTRACTS.md), per sub-layer on one GPU with tensor
parallelism t, context parallelism c and b = ceil(B/dp) sequences:
    b * ceil(Hkv/t) * (D + Dv) * min(T, W) / c * kv_bytes
  Hkv*(D + Dv) rather than 2*Hkv*D so that Dv != D is exact; W = T for global attention (no Min);
  a KV head is replicated when t > Hkv, hence the ceiling. fp8 KV is a 1-byte kv dtype.
Prefill workspace for a chunk of Cc = min(C, T) tokens (a = activation bytes):
    a * b * Cc/c * (H*D + Hkv*D + Hkv*Dv + H*Dv)/t + 4 * b * Cc/c * H/t     (q, k, v, out, fp32 lse)
    without flash attention add the scores: (a + 4) * b * H/t * Cc/c * min(T, W)
Training activations (Korthikanti et al. 2022, section 4.1, generalised to GQA and Dv), per micro-batch:
    replicated  norm input and QKV input 2a*sbh, output dropout mask sbh (dropout only)
    split       q, k, v a*sb*(H*D + Hkv*D + Hkv*Dv); attention output a*sb*H*Dv
    core        flash: fp32 log-sum-exp 4*sb*H; eager: softmax output a*H*b*s*T, with dropout also its
                mask and output (1 + a)*H*b*s*T; selective recompute drops the eager core.
    saved_by = "eager" (ltmdsl's runtime under autograd) adds: RoPE's cos and sin 2a*s*R per layer (one copy
                for the batch); without flash attention the explicit-softmax kernel's fp32 softmax 4*H*b*s*T,
                its boolean mask s*T (one for the batch and heads) and the KV heads repeated to H,
                a*sb*(H - Hkv)*(D + Dv).
FLOPs: decode 2*H*(D + Dv)*min(T, W) (q.k and p.v over the cached keys); prefill the causal sum over
positions i = 1..T of 2*H*(D + Dv)*min(i, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig, RopeScaling
from ltmdsl.kinds.base import (
    CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split, divide, none_inactive,
)
from ltmdsl.memory.symbols import B, C, T, cdiv, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class AttentionConfig(LayerConfig):
    """Multi-head / grouped-query / multi-query softmax attention, optionally windowed.

    q: d -> H*D, k: d -> Hkv*D, v: d -> Hkv*Dv, o: H*Dv -> d. `window` None means global attention;
    otherwise each query sees the last W keys including itself. `rope_theta` None means no RoPE;
    `rope_scaling` (only with RoPE) rescales its frequencies, None means plain RoPE. `rope_dim` (only with
    RoPE; even, 2 <= rope_dim < D) rotates just the first rope_dim channels of each q/k head, with
    frequencies 1/theta^(2i/rope_dim), and passes the rest through (transformers' partial_rotary_factor =
    rope_dim / D, as in Bamba and GPT-NeoX); None rotates the whole head (a spec's rope_dim = head_dim
    resolves to None, so equal models compare equal).
    """

    heads: int  # H
    kv_heads: int  # Hkv
    head_dim: int  # D
    v_head_dim: int  # Dv
    window: int | None  # W
    rope_theta: float | None
    causal: bool
    qkv_bias: bool
    out_bias: bool
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3); eps is the sub-layer norm's eps
    rope_scaling: RopeScaling | None = None  # last and defaulted, so positional constructors keep working
    rope_dim: int | None = None  # R: rotated channels per q/k head; None = all D (defaulted for the same reason)
    kind: str = field(default="attention", init=False)

    @property
    def group_size(self) -> int:
        """G = H / Hkv query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def rotary_dim(self) -> int:
        """R, the channels of each q/k head that RoPE rotates: rope_dim, or the whole head_dim when it is None."""
        return self.head_dim if self.rope_dim is None else self.rope_dim


# ---- front end ----------------------------------------------------------------------------------


def build(v: dict[str, Any], ctx: ModelContext) -> AttentionConfig:
    heads, kv_heads = v["heads"], v["kv_heads"] if v["kv_heads"] is not None else v["heads"]
    if heads % kv_heads:
        raise CheckError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})", "kv_heads")
    head_dim = v["head_dim"]
    if head_dim is None:
        head_dim = divide(ctx.d_model, heads, "head_dim defaults to d_model / heads, but d_model", "heads")
    v_head_dim = v["v_head_dim"] if v["v_head_dim"] is not None else head_dim
    if v["rope_scaling"] is not None and v["rope_theta"] is None:
        raise CheckError("rope_scaling rescales RoPE frequencies, but rope_theta = none turns RoPE off; "
                         "give rope_theta or drop rope_scaling", "rope_scaling")
    rope_dim = _rope_dim(v["rope_dim"], head_dim, v["rope_theta"])
    if v["rope_theta"] is not None and rope_dim is None and head_dim % 2:
        raise CheckError(f"RoPE rotates channels in pairs, so the rotated head_dim must be even, got {head_dim}; "
                         "use an even head_dim, an even rope_dim < head_dim, or rope_theta = none",
                         "head_dim" if v["head_dim"] is not None else "heads")
    return AttentionConfig(
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim, window=v["window"],
        rope_theta=float(v["rope_theta"]) if v["rope_theta"] is not None else None, causal=v["causal"],
        qkv_bias=v["qkv_bias"], out_bias=v["out_bias"], qk_norm=v["qk_norm"], rope_scaling=v["rope_scaling"],
        rope_dim=rope_dim,
    )


def _rope_dim(rope_dim: int | None, head_dim: int, rope_theta: float | None) -> int | None:
    """The checked number of rotated channels per head; None for the whole head (rope_dim = head_dim included).

    RoPE rotates channel pairs (i, i + R/2), so R must be even; it cannot exceed the head, and it means nothing
    without RoPE. (The minimum of 2 is the parameter's range, checked before this.)
    """
    if rope_dim is None:
        return None
    if rope_theta is None:
        raise CheckError("rope_dim chooses how many channels RoPE rotates, but rope_theta = none turns RoPE off; "
                         "give rope_theta or drop rope_dim", "rope_dim")
    if rope_dim % 2:
        raise CheckError(f"rope_dim must be even (RoPE rotates channels in pairs), got {rope_dim}", "rope_dim")
    if rope_dim > head_dim:
        raise CheckError(f"rope_dim ({rope_dim}) cannot exceed head_dim ({head_dim})", "rope_dim")
    return None if rope_dim == head_dim else rope_dim


def count(c: AttentionConfig, d: int) -> int:
    q = d * c.heads * c.head_dim + (c.heads * c.head_dim if c.qkv_bias else 0)
    k = d * c.kv_heads * c.head_dim + (c.kv_heads * c.head_dim if c.qkv_bias else 0)
    v = d * c.kv_heads * c.v_head_dim + (c.kv_heads * c.v_head_dim if c.qkv_bias else 0)
    o = c.heads * c.v_head_dim * d + (d if c.out_bias else 0)
    return q + k + v + o + (2 * c.head_dim if c.qk_norm else 0)


def split(c: AttentionConfig, d: int) -> Split:
    """Tensor parallelism splits the query heads (KV heads are replicated when t > Hkv)."""
    return Split(tp=(("heads", c.heads),))


def context_check(c: AttentionConfig, context: int) -> str | None:
    if c.window is not None and c.window > context:
        return f"has window {c.window}, larger than this budget's context {context}"
    return None


# ---- memory and compute -------------------------------------------------------------------------


def tokens_held(c: AttentionConfig):
    """Tokens an attention layer keeps in its cache at context T: min(T, W), or T when global."""
    return T if c.window is None else sympy.Min(T, c.window)


def cache(c: AttentionConfig, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    kv = b * cdiv(c.kv_heads, s.tp) * (c.head_dim + c.v_head_dim) * tokens_held(c) / R(s.cp) * s.kv_dtype.bytes
    return (CacheTerm("kv_cache", None, s.kv_dtype, kv),)


def workspace(c: AttentionConfig, d: int, s):
    a = s.activation_dtype.bytes
    tok = per_replica(B, s.dp) * sympy.Min(C, T) / R(s.cp)  # b * Cc / c
    t = R(s.tp)
    qkvo = c.heads * c.head_dim + c.kv_heads * (c.head_dim + c.v_head_dim) + c.heads * c.v_head_dim
    out = a * tok * qkvo / t + 4 * tok * c.heads / t
    if not s.flash_attention:
        out += (a + 4) * tok * c.heads / t * tokens_held(c)
    return out


def stored(c: AttentionConfig, x, selective: bool):
    a, tok = x.a, x.tok
    out = x.base + x.split(a * tok * (c.heads * c.head_dim + c.kv_heads * (c.head_dim + c.v_head_dim)))
    out += x.split(a * tok * c.heads * c.v_head_dim)
    if x.dropout:
        out += x.rep(tok * x.h)
    if x.eager and c.rope_theta is not None:
        out += 2 * a * x.s * c.rotary_dim
    if x.flash_attention:
        out += x.split(4 * tok * c.heads)
    elif not selective:
        scores = x.b * x.s * T * c.heads
        out += x.split(a * scores + ((1 + a) * scores if x.dropout else 0))
        if x.eager:
            out += x.split(4 * scores + a * tok * (c.heads - c.kv_heads) * (c.head_dim + c.v_head_dim))
            out += x.s * T
    return out


def _causal_sum(window: int | None):
    """sum_{i=1..T} min(i, W): T(T+1)/2 for global attention, piecewise-exact via Min otherwise."""
    if window is None:
        return T * (T + 1) / 2
    m = sympy.Min(T, window)
    return m * (m + 1) / 2 + (T - m) * window


def flops(c: AttentionConfig) -> dict[str, Flops]:
    width = 2 * c.heads * (c.head_dim + c.v_head_dim)
    return {"attention": Flops(width * tokens_held(c), width * _causal_sum(c.window))}


def dims(c: AttentionConfig) -> str:
    text = f"H={c.heads} Hkv={c.kv_heads} D={c.head_dim}"
    text += f" Dv={c.v_head_dim}" if c.v_head_dim != c.head_dim else ""
    text += f" W={c.window}" if c.window else " global"
    text += f" rope={c.rope_theta:g}" if c.rope_theta else " nope"
    if c.rope_scaling is not None:  # e.g. "llama3x8@8192": frequencies scaled for 8x the 8192-token context
        sc = c.rope_scaling
        text += f" {sc.kind}x{sc.factor:g}@{sc.original_context}"
    if c.rope_dim is not None:  # partial rotary embeddings: only the first rope_dim channels of D rotate
        text += f" rope_dim={c.rope_dim}"
    return text


KIND = Kind(
    name="attention",
    doc="Softmax attention: MHA, GQA (kv_heads < heads) or MQA (kv_heads = 1), global or sliding-window.",
    config=AttentionConfig,
    params=(
        Param("heads", "int", required=True, min=1, doc="query heads H"),
        Param("kv_heads", "int", nullable=True, min=1, doc="key/value heads Hkv (default: heads)"),
        Param("head_dim", "int", nullable=True, min=1, doc="D (default: d_model / heads)"),
        Param("v_head_dim", "int", nullable=True, min=1, doc="Dv (default: head_dim)"),
        Param("window", "int", nullable=True, min=1, doc="sliding window W in tokens (default: none = global)"),
        Param("rope_theta", "float", 10000.0, nullable=True, min=1e-9, doc="RoPE base; none disables RoPE"),
        Param("rope_scaling", "rope_scaling", None, nullable=True,
              doc="RoPE frequency scaling: llama3(factor = ..., low_freq_factor = ..., high_freq_factor = ..., "
                  "original_context = ...) (default: none = plain RoPE)"),
        Param("rope_dim", "int", nullable=True, min=2,
              doc="channels of each q/k head that RoPE rotates, the first ones; even, at most head_dim "
                  "(default: none = the whole head)"),
        Param("causal", "bool", True),
        Param("qkv_bias", "bool", False),
        Param("out_bias", "bool", False),
        Param("qk_norm", "bool", False, doc="per-head RMSNorm on q and k (Qwen3)"),
    ),
    is_ffn=False,
    build=build,
    count=count,
    inactive=none_inactive,
    split=split,
    context_check=context_check,
    cache=cache,
    workspace=workspace,
    stored=stored,
    flops=flops,
    dims=dims,
)
