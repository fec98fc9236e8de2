"""Multi-head latent attention (DeepSeek-AI, "DeepSeek-V2", 2024; DeepSeek-V3, Kimi-Linear): IR config and facets.

The layer, as transformers' DeepseekV3Attention computes it, with H heads, Dn = qk_nope_head_dim,
Dr = qk_rope_head_dim, Dqk = Dn + Dr, Dv = v_head_dim, Rkv = kv_lora_rank and Rq = q_lora_rank:
    q      = q_proj(x)  or, with Rq,  q_b_proj(rmsnorm(q_a_proj(x)))          [H, Dqk]: q_nope [H, Dn], q_rot [H, Dr]
    c, kr  = kv_a_proj_with_mqa(x)                                             [Rkv + Dr]; c = rmsnorm(c)
    k_nope, v = kv_b_proj(c)                                                   [H, Dn], [H, Dv]
    RoPE (decoupled: only q_rot and the one shared kr rotate; DeepSeek's interleaved channel pairs); with
    rope_theta none nothing rotates (Kimi-Linear's MLA layers are NoPE: KimiLinearAttention)
    k = [k_nope ; kr] per head; softmax(q.k * scale) v; o_proj: H*Dv -> d
    scale = Dqk^-1/2, times mscale(factor, mscale_all_dim)^2 under a yarn scaling with mscale_all_dim.
The latent norms have their own eps (`latent_eps`, 1e-6 as DeepSeek's). Biases (`bias`) on q_a_proj,
kv_a_proj_with_mqa and o_proj, as transformers' attention_bias.
Parameters: d*H*Dqk (no Rq) or d*Rq + Rq + Rq*H*Dqk (with Rq), + d*(Rkv + Dr) + Rkv + Rkv*H*(Dn + Dv) + H*Dv*d,
plus the biases.

Cache: the latent, not the keys and values: c and kr, (Rkv + Dr) values per token per layer, in the KV dtype:
    b * (Rkv + Dr) * T / c * kv_bytes
on every tensor-parallel rank (the latent is shared by all heads, so tp does not split it).
Decode absorbs the up-projections (DeepSeek-V2, section 2.1.2): q_lat = W_uk^T q_nope [H, Rkv] scores against
the cached c, and the output (sum_j p_j c_j) goes through W_uv, so no key or value is ever materialised.
Prefill (and chunked prefill) up-projects the latent of every key it attends to.
Prefill workspace for a chunk of Cc = min(C, T) tokens (a = activation bytes, b sequences), what the runtime
holds while the attention runs: the up-projection of all T keys' latents kv [T, H*(Dn + Dv)] (the values are
a view of it), the keys [T, H*Dqk], the values zero-padded to Dqk when Dv < Dqk (SDPA's fused kernels need
equal head dims), the chunk's queries and (padded) output, the fp32 log-sum-exp and the causal mask of
attention's query blocks (ltmdsl.kinds.attention `workspace`):
    a * b * T/c * H*(Dn + Dv + Dqk + pad)/t + a * b * Cc/c * H*(Dqk + max(Dqk, Dv))/t + 4 * b * Cc/c * H/t
    + (1 + a) * min(Cc, mask_rows(T)) * T/c once T > Cc,   pad = Dqk if Dv < Dqk else 0
    without flash attention: a * b * (Cc + T)*(H*Dqk + H*Dv)/c/t + a * b * Cc/c * (Rkv + Dr + Rq)
    + 4 * b * Cc/c * H/t and the scores (a + 4) * b * H/t * Cc/c * T.
Training activations (per micro-batch; Korthikanti et al. 2022 as for attention): replicated the latents
a*sb*(Rq + Rkv + Dr) (and the norm inputs); split q, k, v a*sb*H*(2*Dqk + Dv) and the output a*sb*H*Dv; core
flash 4*sb*H, or eager a*H*b*s*T (with dropout (1 + a)*H*b*s*T more), dropped by selective recompute.
saved_by = "eager" (ltmdsl's runtime under autograd): each LoRA norm (Rq, Rkv) keeps what an eager RMSNorm
keeps, (f + 2a)*sb*R + 4*sb with f = max(4, a), instead of the latents; RoPE its cos and sin, 2a*s*Dr; with
flash attention and Dv < Dqk the values are saved zero-padded to Dqk and SDPA's Dqk-wide output besides the
Dv channels o_proj reads: a*sb*H*(3*Dqk + Dqk + Dv) for q, k, v and the outputs; where the core keeps v itself
(flash with Dv >= Dqk, or the eager core under selective recompute, whose checkpoint keeps its inputs) v is a
view of kv_b_proj's output [sb, H*(Dn + Dv)], which stays whole: a*sb*H*Dn more. Without flash attention and
recompute the explicit-softmax core (`attention_reference`, as transformers' eager attention) keeps, as
attention's does, its fp32 softmax beside the a-byte scores and its boolean causal mask, (a + 4)*H*b*s*T + s*T
(the eager core copies v and k for its einsums: neither keeps kv). Until this convention MLA counted only the
a-byte scores: DeepSeek-V2-Lite's MLA at 2048 tokens traced +110% over its activations without flash attention.
Context parallel (c > 1, the runtime's cp_forward, saved_by = "eager"): every chunk's latent is all-gathered and
each of the rank's p pieces (p = 2 balanced, 1 contiguous; cl = s/p tokens each) attends over the keys up to
its own last token, e_k = (k + 1)*cl for chunk k; the traced (last) rank's pieces hold K = sum e_k keys a row,
K = (p*l + 1)*cl with l its last chunk (c balanced, c - 1 contiguous). Beyond what one process keeps at s
tokens, its pieces keep: the keys a*b*H*Dqk*(K - s); the values, a contiguous copy over the keys in place of
the view of kv_b_proj's output, a*b*H*Dv*K - a*sb*H*(Dn + Dv); SDPA's bottom-right causal mask of each piece
[cl, e_k], a*cl*K; kv_b_proj's input, the gathered latent up to each piece's end, a*b*Rkv*(K - s); and
o_proj's input, the pieces' outputs concatenated, a*sb*H*Dv (with flash attention; under selective recompute
the same without the masks and o_proj's input). Without flash attention and recompute the eager core keeps
its copy of v over the keys and its scores, fp32 softmax and mask over each piece's keys, (a + 4)*b*H*cl*K +
cl*K, in place of one process's (a + 4)*H*b*s*T + s*T; its backward's score gradient is one piece's at a
time, the last one's, cl*(l + 1)*cl pairs a row and head. Until this convention none of it was counted: +18%
over an MLA rank's activations at cp = 2 with flash attention, -19% without.
FLOPs beyond 2 per parameter: decode in the absorbed form 2*H*(Rkv + Dr)*T (scores) + 2*H*Rkv*T (p.c);
prefill 2*H*(Dqk + Dv) * T(T+1)/2 over the up-projected keys and values.
Backward (the `backward` facet, every width /t): the gradients of the core's q, k, v and output,
2a*tok*H*(Dqk + Dv) (the values zero-padded to Dqk for SDPA count in Dqk), plus without flash attention the
scores' gradients max(4, a)*b*s*T*H (attention's count before its 8 - a bytes a score of one piece,
`eager_score_gradient_bytes`, which this facet has not taken yet); or the largest projection's weight
gradient in w beside o_proj's input gradient, when larger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig, RopeScaling
from ltmdsl.kinds.attention import check_longrope, mask_rows, yarn_mscale
from ltmdsl.kinds.base import (
    CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split, none_inactive, none_per_use,
)
from ltmdsl.kinds.base import no_context_limit
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class MLAConfig(LayerConfig):
    """Multi-head latent attention as transformers' DeepseekV3Attention computes it (module docstring)."""

    heads: int  # H
    q_lora_rank: int | None  # Rq; None: a full-rank q_proj
    kv_lora_rank: int  # Rkv
    qk_nope_head_dim: int  # Dn
    qk_rope_head_dim: int  # Dr
    v_head_dim: int  # Dv
    rope_theta: float | None  # None: no RoPE (NoPE), as Kimi-Linear
    rope_scaling: RopeScaling | None
    bias: bool
    latent_eps: float
    kind: str = field(default="mla", init=False)

    @property
    def qk_head_dim(self) -> int:
        """Dqk = Dn + Dr, the query/key head dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent(self) -> int:
        """Rkv + Dr, the cached values per token."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        """The softmax scale: Dqk^-1/2, times mscale(factor, mscale_all_dim)^2 under yarn with mscale_all_dim."""
        s = self.qk_head_dim ** -0.5
        r = self.rope_scaling
        if r is not None and r.kind == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            s = s * m * m
        return s


def build(v: dict[str, Any], ctx: ModelContext) -> MLAConfig:
    if v["qk_rope_head_dim"] % 2:
        raise CheckError(f"qk_rope_head_dim must be even (RoPE rotates channel pairs), got {v['qk_rope_head_dim']}",
                         "qk_rope_head_dim")
    if v["rope_scaling"] is not None and v["rope_theta"] is None:
        raise CheckError("rope_scaling rescales RoPE frequencies, but rope_theta = none turns RoPE off; "
                         "give rope_theta or drop rope_scaling", "rope_scaling")
    check_longrope(v["rope_scaling"], v["qk_rope_head_dim"])
    return MLAConfig(
        heads=v["heads"], q_lora_rank=v["q_lora_rank"], kv_lora_rank=v["kv_lora_rank"],
        qk_nope_head_dim=v["qk_nope_head_dim"], qk_rope_head_dim=v["qk_rope_head_dim"], v_head_dim=v["v_head_dim"],
        rope_theta=float(v["rope_theta"]) if v["rope_theta"] is not None else None,
        rope_scaling=v["rope_scaling"], bias=v["bias"],
        latent_eps=float(v["latent_eps"]),
    )


def count(c: MLAConfig, d: int) -> int:
    H, b = c.heads, c.bias
    if c.q_lora_rank is None:
        q = d * H * c.qk_head_dim
    else:
        q = d * c.q_lora_rank + (c.q_lora_rank if b else 0) + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    kv = d * c.latent + (c.latent if b else 0) + c.kv_lora_rank  # kv_a_proj_with_mqa and kv_a_layernorm
    kv += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b_proj
    return q + kv + H * c.v_head_dim * d + (d if b else 0)


def split(c: MLAConfig, d: int) -> Split:
    """Tensor parallelism splits the heads; the down-projections, their norms and the latent (Megatron-LM's
    MLA split) and the row-parallel o_proj's bias are replicated."""
    b = c.bias
    q = 0 if c.q_lora_rank is None else d * c.q_lora_rank + (c.q_lora_rank if b else 0) + c.q_lora_rank
    kv = d * c.latent + (c.latent if b else 0) + c.kv_lora_rank  # kv_a_proj_with_mqa and kv_a_layernorm
    return Split(tp=(("heads", c.heads),), replicated=q + kv + (d if b else 0))


def cache(c: MLAConfig, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    return (CacheTerm("kv_cache", None, s.kv_dtype, b * c.latent * T / R(s.cp) * s.kv_dtype.bytes),)


def workspace(c: MLAConfig, d: int, s):
    a = s.activation_dtype.bytes
    b = per_replica(B, s.dp)
    cc = Smallest(C, T) / R(s.cp)
    t = R(s.tp)
    if s.flash_attention:
        pad = c.qk_head_dim if c.v_head_dim < c.qk_head_dim else 0
        keys = c.heads * (c.qk_nope_head_dim + c.v_head_dim + c.qk_head_dim + pad)
        out = a * b * T / R(s.cp) * keys / t + a * b * cc * c.heads * (c.qk_head_dim + max(c.qk_head_dim, c.v_head_dim)) / t
        out += 4 * b * cc * c.heads / t
        Cc = Smallest(C, T)
        return out + (1 + a) * Smallest(Cc, mask_rows(T)) * T / R(s.cp) * Smallest(1, T - Cc)
    heads = c.heads * (c.qk_head_dim + c.v_head_dim)
    out = a * b * (cc + T / R(s.cp)) * heads / t + a * b * cc * (c.latent + (c.q_lora_rank or 0))
    out += 4 * b * cc * c.heads / t
    return out + (a + 4) * b * cc * c.heads / t * T


def stored(c: MLAConfig, x, selective: bool):
    a, tok = x.a, x.tok
    out = x.base
    padded = x.eager and x.flash_attention and c.v_head_dim < c.qk_head_dim
    if x.eager:  # the LoRA norms keep what an eager RMSNorm keeps; RoPE its cos and sin
        f = max(4, a)
        for rank in (c.q_lora_rank, c.kv_lora_rank):
            if rank:
                out += x.within((f + 2 * a) * tok * rank + 4 * tok)
        if c.rope_theta is not None:
            out += 2 * a * x.s * c.qk_rope_head_dim
    else:
        out += x.within(a * tok * (c.latent + (c.q_lora_rank or 0)))
    v_saved = c.qk_head_dim if padded else c.v_head_dim  # values zero-padded to Dqk for SDPA's fused kernel
    out += x.split(a * tok * c.heads * (2 * c.qk_head_dim + v_saved))
    out += x.split(a * tok * c.heads * c.v_head_dim)
    if padded:  # SDPA's own output, Dqk wide, beside the Dv channels o_proj reads
        out += x.split(a * tok * c.heads * c.qk_head_dim)
    if x.eager and (selective or x.flash_attention) and not padded:
        # SDPA's saved v (or the recomputed eager core's checkpointed input) is a view of kv_b_proj's output
        # [tok, H*(Dn + Dv)], which stays whole: its Dn key channels too (the eager core's repeat_interleave
        # copies v instead, and F.pad does when Dv < Dqk)
        out += x.split(a * tok * c.heads * c.qk_nope_head_dim)
    if x.dropout:
        out += x.rep(tok * x.h)
    if x.flash_attention:
        out += x.split(4 * tok * c.heads)
    elif not selective:
        scores = x.b * x.s * T * c.heads
        out += x.split(a * scores + ((1 + a) * scores if x.dropout else 0))
        if x.eager:  # the explicit-softmax core keeps its fp32 softmax and its boolean causal mask
            out += x.split(4 * scores) + x.s * T
    if x.c > 1 and x.eager:
        out += _context_parallel(c, x, selective)
    return out


def _context_parallel(c: MLAConfig, x, selective: bool):
    """What a cp rank's pieces keep beyond what `stored` counts for one process at s tokens (module docstring)."""
    a, tok = x.a, x.tok
    cl = x.s / x.pieces  # tokens of one piece
    keys = (x.pieces * x.last_chunk + 1) * cl  # K: keys the rank's pieces attend over, per row
    # k over every key; v a contiguous copy over every key; kv_b_proj's input, the gathered latents
    out = x.split(a * x.b * c.heads * (c.qk_head_dim * (keys - x.s) + c.v_head_dim * keys))
    out += x.within(a * x.b * c.kv_lora_rank * (keys - x.s))
    if x.flash_attention or selective:  # the one-process core kept v as a view of kv_b_proj's output: not here
        out -= x.split(a * tok * c.heads * (c.qk_nope_head_dim + c.v_head_dim))
    else:  # the eager core's v copy, scores, softmax and mask over each piece's keys rather than s and s x T
        out -= x.split(a * tok * c.heads * c.v_head_dim)
        out += x.split((a + 4) * x.b * c.heads * (cl * keys - x.s * T)) + cl * keys - x.s * T
    if x.flash_attention:  # SDPA's bottom-right causal mask of each piece; o_proj's input, the pieces' outputs
        out += a * cl * keys + x.split(a * tok * c.heads * c.v_head_dim)
    return out


def flops(c: MLAConfig) -> dict[str, Flops]:
    decode = 2 * c.heads * (c.latent + c.kv_lora_rank) * T  # absorbed: q_lat.c + q_rot.kr, then p.c
    prefill = 2 * c.heads * (c.qk_head_dim + c.v_head_dim) * T * (T + 1) / 2
    return {"attention": Flops(decode, prefill)}


def dims(c: MLAConfig) -> str:
    text = f"H={c.heads} q_lora={c.q_lora_rank or 'none'} kv_lora={c.kv_lora_rank} nope={c.qk_nope_head_dim} "
    text += f"rope={c.qk_rope_head_dim} Dv={c.v_head_dim} latent={c.latent}/token "
    text += f"theta={c.rope_theta:g}" if c.rope_theta is not None else "nope"
    if c.rope_scaling is not None:
        sc = c.rope_scaling
        text += f" {sc.kind}x{sc.factor:g}" + (f"@{sc.original_context}" if sc.original_context else "")
    return text


def backward(c: MLAConfig, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring)."""
    a, tok = x.a, x.tok
    grads = x.split(2 * a * tok * c.heads * (c.qk_head_dim + c.v_head_dim))
    if not x.flash_attention:  # the eager core's score gradient; under cp one piece's at a time, the last's
        # queries (s/p of them) against its keys, the (l + 1)*s/p up to its last token (l: its chunk)
        pairs = x.s * T if x.c == 1 else (x.s / x.pieces) ** 2 * (x.last_chunk + 1)
        grads += x.split(max(4, a) * x.b * pairs * c.heads)
    q_in = c.q_lora_rank or x.h
    weight = x.split(a * tok * c.heads * c.v_head_dim + x.w * max(c.heads * c.qk_head_dim * q_in, x.h * c.heads * c.v_head_dim))
    return Largest(grads, weight)


KIND = Kind(
    name="mla",
    doc="Multi-head latent attention (DeepSeek-V2/V3, Kimi-Linear): a cached low-rank latent with decoupled RoPE.",
    config=MLAConfig,
    params=(
        Param("heads", "int", required=True, min=1, doc="query heads H"),
        Param("q_lora_rank", "int", None, nullable=True, min=1,
              doc="rank Rq of the query's low-rank projection (default: none = a full-rank q_proj)"),
        Param("kv_lora_rank", "int", 512, min=1, doc="rank Rkv of the cached key/value latent"),
        Param("qk_nope_head_dim", "int", 128, min=1, doc="query/key channels per head without RoPE"),
        Param("qk_rope_head_dim", "int", 64, min=2, doc="query/key channels per head with RoPE (one shared key)"),
        Param("v_head_dim", "int", 128, min=1, doc="value channels per head"),
        Param("rope_theta", "float", 10000.0, nullable=True, min=1e-9,
              doc="RoPE base; none: no RoPE (Kimi-Linear's NoPE MLA)"),
        Param("rope_scaling", "rope_scaling", None, nullable=True,
              doc="llama3(...), linear(...), dynamic(...), yarn(...) or longrope(...) (default: none = plain RoPE)"),
        Param("bias", "bool", False, doc="biases on q_a_proj, kv_a_proj_with_mqa and o_proj"),
        Param("latent_eps", "float", 1e-6, min=1e-30, doc="eps of the latent RMSNorms"),
    ),
    is_ffn=False,
    build=build,
    count=count,
    inactive=none_inactive,
    split=split,
    context_check=no_context_limit,
    cache=cache,
    workspace=workspace,
    stored=stored,
    backward=backward,
    flops=flops,
    dims=dims,
    per_use=none_per_use,
)
