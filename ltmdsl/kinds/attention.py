"""Softmax attention (MHA, GQA, MQA; global or sliding-window): its IR config and every pure facet.

KV cache, as the runtime allocates it (docs/CONTRACTS.md), per sub-layer on one GPU with tensor
parallelism t, context parallelism c and b = ceil(B/dp) sequences:
    b * ceil(Hkv/t) * (D + Dv) * min(T, W) / c * kv_bytes
  Hkv*(D + Dv) rather than 2*Hkv*D so that Dv != D is exact; W = T for global attention (no Min);
  a KV head is replicated when t > Hkv, hence the ceiling. fp8 KV is a 1-byte kv dtype.
Prefill workspace for a chunk of Cc = min(C, T) tokens (a = activation bytes):
    a * b * Cc/c * (H*D + Hkv*D + Hkv*Dv + H*Dv)/t + 4 * b * Cc/c * H/t     (q, k, v, out, fp32 lse)
    without flash attention add the scores: (a + 4) * b * H/t * Cc/c * min(T, W); with flash, a chunk whose
    queries do not start at key 0 needs a causal mask, materialised a few query rows at a time, r = min(Cc,
    `mask_rows`(keys)), as booleans and SDPA's additive copy: (1 + a) * r * T/c once T > Cc for global
    attention (a context-parallel rank attends over its T/c cached keys); with a window, keys = min(T, W + Cc),
    r = min(Cc, `window_rows`(W)) queries a block: (1 + a) * r * min(keys, r + W - 1), and the ring's keys
    read back in time order beside the chunk's,
    a * b * keys * Hkv*(D + Dv). A global layer's KV cache in another dtype than a's (fp8) is read back whole
    in a's dtype for the chunk's attention (the PyTorch runtime converts, it has no kernel reading fp8 tiles):
    a * b * T/c * ceil(Hkv/t)*(D + Dv) beside the rest. A ring (window or chunk) reads its keys back in time
    order in either case (counted above). The workspace is the larger of that and a decode step's over the
    S = min(T, W)/c cached slots: the einsum's contiguous copy of the keys (then values) beside the scores,
    b*S*max(a*ceil(Hkv/t)*D + a*H/t, (a + 8)*H/t, a*H/t + a*ceil(Hkv/t)*Dv), plus an fp8 cache read back
    whole in a's dtype, a*b*S*ceil(Hkv/t)*(D + Dv).
Training activations (Korthikanti et al. 2022, section 4.1, generalised to GQA and Dv), per micro-batch:
    replicated  norm input and QKV input 2a*sbh, output dropout mask sbh (dropout only)
    split       q, k, v a*sb*(H*D + Hkv*D + Hkv*Dv); attention output a*sb*H*Dv
    core        flash: fp32 log-sum-exp 4*sb*H; eager: softmax output a*H*b*P, with dropout also its
                mask and output (1 + a)*H*b*P; selective recompute drops the eager core. P, the query-key pairs
                scored (`eager_reach`), is s*T in one process; under context parallelism each of the rank's
                pieces of L = T/chunks queries is scored against the (k + 1)*L keys up to its last token,
                P = L^2 * sum(k + 1) (5/8 of s*T on the last rank of cp 2, balanced; s*T had over-counted
                eager attention's activations by 21% at d_model 64, global or windowed).
    context parallel (c > 1, flash): the most loaded (last) rank keeps every rank's keys and
                values, all-gathered, a*b*(T - s)*(Hkv*(D + Dv)) beyond its own, the pieces' outputs beside
                their concatenation, a*sb*H*Dv, and for global attention each piece's causal mask in a's dtype
                (SDPA's additive copy, saved for backward; in blocks of `mask_rows` queries: `causal_masks`;
                until this convention a*s*T and one output, +0.9% balanced, +3.6% contiguous at d_model 64).
                A window does not shorten what is gathered: its queries' saved keys are views of the gathered
                keys, so windowed attention keeps them too (counted since this convention; until then nothing,
                -8% on a tp 8 x cp 8 rank of ltm-100m's working set). Eager attention under cp keeps no
                gathered keys without recompute (its repeated copies over each piece's keys, below), but
                under selective recompute the checkpointed calls' inputs, views of them, keep them whole.
    window (flash): SDPA's additive copy of each query block's mask, a * `window_mask_elements` (blocks of
                r = `window_rows`(W) queries against the r + W - 1 keys their window reaches, fewer at the
                sequence's start; per cp piece), shared by the batch and heads; and the output a second time,
                a*sb*H*Dv, when it is formed in parts (the blocks' SDPA outputs, saved, copied into one tensor:
                T > r, or always under cp, whose pieces are concatenated). Until this convention neither was
                counted (+9% to +21% of windowed attention's activations at d_model 64, with or without cp).
    saved_by = "eager" (ltmdsl's runtime under autograd) adds: RoPE's cos and sin 2a*s*R per layer (one copy
                for the batch); without flash attention the explicit-softmax kernel's fp32 softmax 4*H*b*P,
                its boolean mask P (one for the batch and heads) and the KV heads repeated to H over the keys
                each call reads, a*b*(H*K - Hkv*s)*(D + Dv) beyond the rank's own (K = T in one process, the
                pieces' keys L * sum(k + 1) under cp; `eager_core`).
FLOPs: decode 2*H*(D + Dv)*min(T, W) (q.k and p.v over the cached keys); prefill the causal sum over
positions i = 1..T of 2*H*(D + Dv)*min(i, W).
Backward (the `backward` facet: what one sub-layer's backward holds at its peak beyond `stored` and its output's
gradient, every width /t): the gradients of the core's inputs and output, dq and do (H*D, H*Dv) and dk and dv
(Hkv*(D + Dv); SDPA's GQA path forms them per key head), a*tok*(H + Hkv)*(D + Dv); without flash attention the
scores' gradients too, of one piece at a time under cp (the last, whose keys are the most), (8 - a)*b*P'*H
(`eager_score_gradient_bytes`: softmax's backward reads the probabilities' gradient cast to fp32 and writes
the scores' fp32 gradient while the kept probabilities in a are freed; 2a in fp32 and fp64), P' = s*T in one
process (until this convention max(4, a) bytes: a layer's traced peak at T = 1024 was +16.9% over the per-GPU
total), and under selective recompute with two pieces only the last piece's core is live again (each call is
its own checkpoint); with a softcap or sinks (the explicit-softmax variant) max(4, a)*b*s*T*H; or o_proj's
weight gradient in w beside its input's, when larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig, RopeScaling
from ltmdsl.kinds.base import (
    CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split, divide, none_inactive, none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, cdiv, per_replica

R = sympy.Rational

#: When the runtime must materialise a causal mask (runtime/ops_attention.py `attention`) it goes QUERY_BLOCK
#: queries at a time, fewer when the keys are many, so that a mask holds about MASK_ELEMENTS (at least one row).
QUERY_BLOCK = 256
MASK_ELEMENTS = 1 << 26


def mask_rows(keys):
    """Query rows per masked SDPA call over `keys` keys: min(QUERY_BLOCK, max(1, floor(MASK_ELEMENTS / keys))),
    for an int (the runtime) or a sympy expression (the memory model)."""
    if isinstance(keys, int):
        return min(QUERY_BLOCK, max(1, MASK_ELEMENTS // keys))
    return Smallest(QUERY_BLOCK, Largest(1, sympy.floor(MASK_ELEMENTS / keys)))


def window_rows(window: int) -> int:
    """Query rows per SDPA call of a windowed attention (runtime/ops_attention.py `attention`): blocks of
    max(W, 128) queries, fewer where a block's mask over the r + W - 1 keys its window reaches would pass
    MASK_ELEMENTS (`mask_rows`), so that every block's mask is within the bound."""
    blk = max(window, 128)
    return min(blk, mask_rows(blk + window - 1))


def window_mask_elements(window: int, tq, shift):
    """Elements of the masks one windowed attention call makes, over all its query blocks: tq queries whose
    first sits `shift` keys past the first key (the keys before the window's reach are dropped first,
    shift' = min(shift, W - 1)). Blocks of r = `window_rows`(W) rows, block i (q0 = i*r, r_i rows) against
    r_i + min(shift' + q0, W - 1) keys:
        sum r_i^2 + tq*(W - 1) - deficit,   sum r_i^2 = r^2*floor(tq/r) + (tq - r*floor(tq/r))^2
        deficit = sum over the first blocks of r_i * (D - q0), D = W - 1 - shift' (their keys before the
                  sequence start): with F = min(ceil(D/r), floor(tq/r)) whole such blocks,
                  r*F*D - r^2*F*(F - 1)/2 + (tq - F*r) * max(0, D - F*r)
    tq and shift may be sympy expressions in T (training's tokens per rank and a cp piece's offset)."""
    W, tq, shift = window, sympy.sympify(tq), sympy.sympify(shift)  # exact division for ints too
    r = window_rows(W)
    whole = sympy.floor(tq / r)
    squares = r * r * whole + (tq - r * whole) ** 2
    D = W - 1 - Smallest(shift, W - 1)
    F = Smallest(sympy.ceiling(D / r), whole)
    deficit = r * F * D - r * r * F * (F - 1) / 2 + (tq - F * r) * Largest(0, D - F * r)
    return squares + tq * (W - 1) - deficit


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

    Variants (docs/LANGUAGE.md): `gate` (Qwen3-Next) widens q_proj to H*2D, each head's D query channels followed
    by its D gate channels, and multiplies the attention output by sigmoid(gate) before o_proj (needs Dv = D);
    `sinks` (gpt-oss) adds one learned logit per head to every softmax denominator (H parameters, `sinks`);
    `softcap` (Gemma-2) maps the scaled scores s to softcap * tanh(s / softcap) before the mask; `qk_l2_norm`
    (Llama-4) divides each q and k head by its root mean square (sqrt(mean(x^2) + eps), no weights, before RoPE,
    which does not change it); `chunk` C (Llama-4's chunked attention) lets query p see keys j <= p with
    floor(j / C) = floor(p / C), and the cache keeps the last min(T, C) tokens like a window of C;
    `query_pre_attn_scalar` s (Gemma-2/3) makes the softmax scale s^-1/2 instead of D^-1/2;
    `temperature_floor` F with `temperature_scale` a (Llama-4's attention temperature tuning of its NoPE layers,
    Nakanishi 2025) multiplies the query at position p by 1 + a * ln(1 + floor((p + 1) / F)), after RoPE and
    the qk norm: 1 for the first F - 1 positions, growing with the log of the position beyond.
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
    gate: bool = False  # Qwen3-Next: q_proj also emits a per-channel gate, output * sigmoid(gate)
    sinks: bool = False  # gpt-oss: a learned logit per head in every softmax denominator
    softcap: float | None = None  # Gemma-2: scores become softcap * tanh(scores / softcap)
    qk_l2_norm: bool = False  # Llama-4: q and k divided by their root mean square per head, no weights
    chunk: int | None = None  # Llama-4: attention only within aligned chunks of this many tokens
    query_pre_attn_scalar: float | None = None  # Gemma-2/3: softmax scale s^-1/2 instead of D^-1/2
    kind: str = field(default="attention", init=False)
    scale: float | None = None  # the score scale; None = 1/sqrt(D) (Granite's attention_multiplier otherwise)
    temperature_floor: int | None = None  # Llama-4: queries scaled by 1 + a * ln(1 + floor((p + 1) / F))
    temperature_scale: float | None = None  # a; set (default 0.1) exactly when temperature_floor is

    @property
    def score_scale(self) -> float:
        """What q.k is multiplied by before the softmax: `scale` (Granite's attention_multiplier), else
        query_pre_attn_scalar^-1/2 (Gemma-2/3), else head_dim^-1/2."""
        if self.scale is not None:
            return self.scale
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def plain_softmax(self) -> bool:
        """True when the scores go straight into a softmax (no sinks, no soft cap): the SDPA kernels apply."""
        return not self.sinks and self.softcap is None

    @property
    def span(self) -> int | None:
        """The most keys a query can see (and the cache holds): the window or the chunk; None when global."""
        return self.window if self.window is not None else self.chunk

    @property
    def group_size(self) -> int:
        """G = H / Hkv query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def rotary_dim(self) -> int:
        """R, the channels of each q/k head that RoPE rotates: rope_dim, or the whole head_dim when it is None."""
        return self.head_dim if self.rope_dim is None else self.rope_dim


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1), as transformers' get_mscale."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(s: RopeScaling | None) -> float:
    """The factor on cos and sin (transformers' attention_factor), 1 except for two scalings. longrope: the
    explicit attention_factor, else sqrt(1 + ln(factor) / ln(original_context)) for factor > 1
    (`_compute_longrope_parameters`). yarn: the explicit attention_factor, else mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) when both are given (and nonzero), else mscale(factor)
    (`_compute_yarn_parameters`)."""
    if s is None or s.kind not in ("yarn", "longrope"):
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor
    if s.kind == "longrope":  # `_compute_longrope_parameters`
        return 1.0 if s.factor <= 1 else math.sqrt(1 + math.log(s.factor) / math.log(s.original_context))
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


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
    check_longrope(v["rope_scaling"], rope_dim or head_dim)
    if v["rope_theta"] is not None and rope_dim is None and head_dim % 2:
        raise CheckError(f"RoPE rotates channels in pairs, so the rotated head_dim must be even, got {head_dim}; "
                         "use an even head_dim, an even rope_dim < head_dim, or rope_theta = none",
                         "head_dim" if v["head_dim"] is not None else "heads")
    if v["gate"] and v_head_dim != head_dim:
        raise CheckError(f"gate multiplies each output channel by a gate channel emitted beside the query, so it needs "
                         f"v_head_dim = head_dim, got {v_head_dim} and {head_dim}", "gate")
    if v["qk_l2_norm"] and v["qk_norm"]:
        raise CheckError("qk_l2_norm and qk_norm both normalise q and k; choose one", "qk_l2_norm")
    if v["chunk"] is not None and v["window"] is not None:
        raise CheckError("chunk and window both limit the keys a query sees; a layer takes one of them", "chunk")
    if v["chunk"] is not None and not v["causal"]:
        raise CheckError("chunked attention is causal (a query sees the earlier keys of its chunk); "
                         "drop chunk or causal = false", "chunk")
    if v["sinks"] and not v["causal"]:
        raise CheckError("attention sinks are implemented for causal attention only; drop sinks or causal = false",
                         "sinks")
    if v["scale"] is not None and v["query_pre_attn_scalar"] is not None:
        raise CheckError("scale and query_pre_attn_scalar both set the softmax scale; give one", "scale")
    if v["temperature_scale"] is not None and v["temperature_floor"] is None:
        raise CheckError("temperature_scale scales the query temperature that temperature_floor turns on; give "
                         "temperature_floor too, or drop temperature_scale", "temperature_scale")
    return AttentionConfig(
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim, window=v["window"],
        rope_theta=float(v["rope_theta"]) if v["rope_theta"] is not None else None, causal=v["causal"],
        qkv_bias=v["qkv_bias"], out_bias=v["out_bias"], qk_norm=v["qk_norm"], rope_scaling=v["rope_scaling"],
        rope_dim=rope_dim, scale=float(v["scale"]) if v["scale"] is not None else None, gate=v["gate"],
        sinks=v["sinks"],
        softcap=float(v["softcap"]) if v["softcap"] is not None else None, qk_l2_norm=v["qk_l2_norm"],
        chunk=v["chunk"],
        query_pre_attn_scalar=float(v["query_pre_attn_scalar"]) if v["query_pre_attn_scalar"] is not None else None,
        temperature_floor=v["temperature_floor"],
        temperature_scale=None if v["temperature_floor"] is None else
        float(v["temperature_scale"]) if v["temperature_scale"] is not None else 0.1,
    )


def check_longrope(s: RopeScaling | None, rotated: int) -> None:
    """LongRoPE gives one factor per rotated channel pair: both lists must have rotated / 2 entries."""
    if s is not None and s.kind == "longrope" and len(s.short_factor) != rotated // 2:
        raise CheckError(f"longrope() has {len(s.short_factor)} factors per list, but RoPE rotates {rotated} channels "
                         f"here, {rotated // 2} pairs: give one factor per pair", "rope_scaling")


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
    qw = c.heads * c.head_dim * (2 if c.gate else 1)  # the gate doubles q_proj's outputs
    q = d * qw + (qw if c.qkv_bias else 0)
    k = d * c.kv_heads * c.head_dim + (c.kv_heads * c.head_dim if c.qkv_bias else 0)
    v = d * c.kv_heads * c.v_head_dim + (c.kv_heads * c.v_head_dim if c.qkv_bias else 0)
    o = c.heads * c.v_head_dim * d + (d if c.out_bias else 0)
    return q + k + v + o + (2 * c.head_dim if c.qk_norm else 0) + (c.heads if c.sinks else 0)


def kv_params(c: AttentionConfig, d_in: int) -> int:
    """k_proj and v_proj reading d_in channels, with their biases."""
    rows = c.kv_heads * (c.head_dim + c.v_head_dim)
    return rows * d_in + (rows if c.qkv_bias else 0)


def split(c: AttentionConfig, d: int) -> Split:
    """Tensor parallelism splits the query heads (and the sink logits with them) and the KV heads, which
    beyond t = Hkv it replicates (each rank holds the KV head its query heads use: `grouped`); the
    row-parallel o_proj's bias and the qk-norm weights (one head_dim each, shared by every head) are
    replicated."""
    return Split(tp=(("heads", c.heads),), grouped=(("kv heads", c.kv_heads, kv_params(c, d)),),
                 replicated=(d if c.out_bias else 0) + (2 * c.head_dim if c.qk_norm else 0))


def context_check(c: AttentionConfig, context: int) -> str | None:
    if c.window is not None and c.window > context:
        return f"has window {c.window}, larger than this budget's context {context}"
    if c.chunk is not None and c.chunk > context:
        return f"has chunk {c.chunk}, larger than this budget's context {context}"
    return None


# ---- memory and compute -------------------------------------------------------------------------


def tokens_held(c: AttentionConfig):
    """Tokens an attention layer keeps in its cache at context T: min(T, W) (or the chunk C), T when global."""
    return T if c.span is None else Smallest(T, c.span)


def cache(c: AttentionConfig, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    kv = b * cdiv(c.kv_heads, s.tp) * (c.head_dim + c.v_head_dim) * tokens_held(c) / R(s.cp) * s.kv_dtype.bytes
    return (CacheTerm("kv_cache", None, s.kv_dtype, kv),)


def workspace(c: AttentionConfig, d: int, s):
    """The larger of a prefill chunk's workspace (`prefill_workspace`) and a decode step's (`decode_workspace`)."""
    return Largest(prefill_workspace(c, s), decode_workspace(c, s))


def decode_workspace(c: AttentionConfig, s):
    """One decode step over the S = tokens_held(T)/c cached slots (runtime `attention_decode`): the scores (a,
    then their fp32 copy and softmax, 8 bytes, per head and slot), and, when b > 1 and Hkv/t > 1, the einsum's
    contiguous copy of the keys (then the values), a*b*S*ceil(Hkv/t)*D, beside them (its [b, Hkv] batch of
    [S, D] matrices is one stride apart only for a single sequence or a single KV head: no copy then); a cache
    in another dtype than a's is first read back whole in a's dtype, a*b*S*ceil(Hkv/t)*(D + Dv)."""
    a = s.activation_dtype.bytes
    b = per_replica(B, s.dp)
    slots = tokens_held(c) / R(s.cp)
    hkv, h = cdiv(c.kv_heads, s.tp), c.heads / R(s.tp)
    copies = 0 if hkv == 1 else Smallest(1, b - 1)  # 1 when b > 1 (b is a whole number), else 0
    out = b * slots * Largest(copies * a * hkv * c.head_dim + a * h, (a + 8) * h,
                                a * h + copies * a * hkv * c.v_head_dim)
    if s.kv_dtype.name != s.activation_dtype.name:
        out += a * b * slots * hkv * (c.head_dim + c.v_head_dim)
    return out


def cp_prefill_workspace(c: AttentionConfig, s):
    """A prefill chunk's workspace on one rank of context-parallel inference (ltmdsl.distributed.cp_inference):
    the rank's tok = b*Cc/c queries, keys and values; the chunk's keys and values all-gathered, a*b*Cc*Hkv*(D + Dv);
    while the cached keys are read (T > Cc), one rank's shard received, a*b*T/c*Hkv*(D + Dv); the merged output
    in fp32 (fp64 for fp64), one part's output and the queries with their KV head's group folded together, each
    tok*H*D; the parts' log-sum-exps, fp32 per query and head. A window reads explicit scores over the chunk's
    keys or a shard's slots, the larger: one fp32 score tensor (masked and exponentiated in place) and the
    log-sum-exp's working copy, with the [Cc/c, keys] mask and its negation. Heads per tp rank."""
    a = s.activation_dtype.bytes
    w = max(4, a)
    b = per_replica(B, s.dp)
    Cc = Smallest(C, T)
    tok = b * Cc / R(s.cp)
    hkv, h = cdiv(c.kv_heads, s.tp), c.heads / R(s.tp)
    kv = hkv * (c.head_dim + c.v_head_dim)
    out = a * tok * (h * c.head_dim + kv) + a * b * Cc * kv + tok * h * (w * c.v_head_dim + a * c.head_dim
                                                                        + a * c.v_head_dim + 3 * 4)
    out += a * b * tokens_held(c) / R(s.cp) * kv * Smallest(1, T - Cc)
    if c.window is not None:
        keys = Largest(Cc, tokens_held(c) / R(s.cp))
        out += 2 * w * tok * h * keys + 2 * Cc / R(s.cp) * keys
    return Largest(out, rope_moment(c, s))


def rope_moment(c: AttentionConfig, s):
    """RoPE over a prefill chunk's projections (runtime `apply_rope`: x*cos + rotate_half(x)*sin holds three
    temporaries of x's size): rotating q beside q_proj's output and k, v (three of q's size), then k beside
    those and the rotated q (three of k's size), a*tok/t each. 0 without RoPE."""
    if c.rope_theta is None:
        return 0
    a, t = s.activation_dtype.bytes, R(s.tp)
    tok = per_replica(B, s.dp) * Smallest(C, T) / R(s.cp)
    hkv = cdiv(c.kv_heads, s.tp)
    qp = c.heads / t * c.head_dim * (2 if c.gate else 1)  # q_proj's output (with the gate)
    q, kv = c.heads / t * c.head_dim, hkv * (c.head_dim + c.v_head_dim)
    return a * tok * Largest(qp + kv + 3 * q, qp + q + kv + 3 * hkv * c.head_dim)


def prefill_workspace(c: AttentionConfig, s):
    """The workspace of a prefill chunk (module docstring); under context parallelism `cp_prefill_workspace`."""
    if s.cp > 1 and s.mode == "inference":
        return cp_prefill_workspace(c, s)
    a = s.activation_dtype.bytes
    b = per_replica(B, s.dp)
    Cc = Smallest(C, T)
    tok = b * Cc / R(s.cp)  # b * Cc / c
    t = R(s.tp)
    qkvo = c.heads * c.head_dim * (2 if c.gate else 1) + c.kv_heads * (c.head_dim + c.v_head_dim)
    qkvo += c.heads * c.v_head_dim
    readback = 0
    if c.span is None and s.kv_dtype.name != s.activation_dtype.name:  # the cache read back in a's dtype
        readback = a * b * T / R(s.cp) * cdiv(c.kv_heads, s.tp) * (c.head_dim + c.v_head_dim)
    out = a * tok * qkvo / t + 4 * tok * c.heads / t + readback
    if not s.flash_attention or not c.plain_softmax:  # sinks and soft caps run the explicit-softmax path
        return Largest(out + (a + 4) * tok * c.heads / t * tokens_held(c), rope_moment(c, s))
    if c.chunk is None:
        if c.window is None:  # the chunk's queries start past key 0 once T > Cc: a [rows, T] mask
            # The kernel's moment: the queries, the output and the mask (bool and SDPA's additive copy, 1 + a
            # bytes); the chunk's own keys and values were written to the cache and released. Beside it the
            # projections' moment (`out`) and RoPE's (`rope_moment`). (The mask had been added to q, k, v and
            # o, which at 128Ki over-counted Mixtral's GQA by 6% and happened to equal Llama-2-7B's RoPE
            # moment; at 16Ki an MHA attention at d_model 4096 was under-predicted by 29%.)
            rows = Smallest(Cc, mask_rows(T))
            mask = (1 + a) * rows * T / R(s.cp) * Smallest(1, T - Cc)  # min(1, T - Cc): 1 when T > Cc, else 0
            qo = c.heads * c.head_dim * (2 if c.gate else 1) + c.heads * c.v_head_dim
            return Largest(out, a * tok * qo / t + 4 * tok * c.heads / t + readback + mask, rope_moment(c, s))
        else:  # a window: a [rows, keys] mask, and the ring's keys read back in time order beside the chunk's
            keys = Smallest(T, c.window + Cc)
            rows = Smallest(Cc, window_rows(c.window))  # a query block, against the keys its window reaches
            out += (1 + a) * rows * Smallest(keys, rows + c.window - 1)
            out += a * b * keys * cdiv(c.kv_heads, s.tp) * (c.head_dim + c.v_head_dim)
    return Largest(out, rope_moment(c, s))


def stored(c: AttentionConfig, x, selective: bool):
    a, tok = x.a, x.tok
    out = x.base + x.split(a * tok * (c.heads * c.head_dim + c.kv_heads * (c.head_dim + c.v_head_dim)))
    out += x.split(a * tok * c.heads * c.v_head_dim)
    if c.gate:  # the gate and the gated output, beside the attention output
        out += x.split(2 * a * tok * c.heads * c.v_head_dim)
    if x.dropout:
        out += x.rep(tok * x.h)
    if x.eager and c.rope_theta is not None:
        out += 2 * a * x.s * c.rotary_dim
    if x.flash_attention and c.plain_softmax:
        out += x.split(4 * tok * c.heads)
        if c.window is not None:  # SDPA's additive copy of each query block's mask, saved for backward, and
            # the output twice once it is formed in parts: the parts' SDPA outputs (saved) and the tensor they
            # are copied into, under cp always (the pieces' concatenation), else when the queries go in blocks
            out += a * window_masks(c, x)
            if x.c == 1:
                out += Smallest(1, sympy.floor(T / (window_rows(c.window) + 1))) * x.split(a * tok * c.heads * c.v_head_dim)
        if x.c > 1:  # context parallel: the last rank's queries attend to every rank's keys
            # all-gathered (cp_forward), which the saved views of them keep whole, a window or not; the pieces'
            # outputs (saved) are concatenated into a second copy
            out += x.split(a * x.b * (T - x.s) * c.kv_heads * (c.head_dim + c.v_head_dim))
            out += x.split(a * tok * c.heads * c.v_head_dim)
            if c.span is None:
                out += a * causal_masks(x)
    elif not selective:
        out += eager_core(c, x, *eager_reach(x), own=x.s)
    elif x.c > 1:  # selective under cp: the recomputed core's inputs, views of every rank's gathered keys and
        # values, keep them whole
        out += x.split(a * x.b * (T - x.s) * c.kv_heads * (c.head_dim + c.v_head_dim))
    return out


def eager_core(c: AttentionConfig, x, pairs, keys, own=0):
    """What the explicit-softmax core keeps over `pairs` query-key pairs and `keys` keys (a sequence and a head;
    `eager_reach`): the probabilities in a (with dropout its mask and output), and under the eager convention
    the fp32 softmax, the boolean mask and the keys and values with their KV heads repeated to H, less the `own`
    tokens' keys and values at Hkv heads (`stored` counts the rank's own keys and values already; the runtime
    keeps them as these copies)."""
    a, scores = x.a, x.b * pairs * c.heads
    out = x.split(a * scores + ((1 + a) * scores if x.dropout else 0))
    if x.eager:
        out += x.split(4 * scores + a * x.b * (keys * c.heads - own * c.kv_heads) * (c.head_dim + c.v_head_dim))
        out += pairs
    return out


def eager_score_gradient_bytes(a: int) -> int:
    """Bytes a score the eager core's backward holds at its peak beyond what it keeps (runtime
    `attention_reference`): softmax's backward reads the probabilities' gradient cast to fp32 and writes the
    scores' fp32 gradient, 8 bytes, while the probabilities in a it kept for the value product have been freed
    (8 - a); in fp32 and fp64 the probabilities are the softmax's own output, kept until then, so 2a. Traced:
    a one-process layer at T = 1024 held 6 bytes a score at a = 2 where the facet had counted max(4, a) (its
    traced peak +16.9% over the per-GPU total; -1.4% since)."""
    return 8 - a if a < 4 else 2 * a


def eager_reach(x, largest_piece: bool = False):
    """(query-key pairs, keys) the explicit-softmax core scores for one sequence and head on the traced rank: one
    call over its s = T queries and T keys in one process, (T^2, T); under context parallelism (cp_forward) one
    call per piece of L = T/chunks queries, piece k against the (k + 1)*L keys up to its last token, so
    (L^2 * sum(k + 1), L * sum(k + 1)) over the rank's pieces: 5/8 of s*T on the last rank of cp 2 (balanced).
    Until this convention the facet counted s*T under cp (-21% of the activations of attention at d_model 64).
    `largest_piece`: the last piece's alone, L^2 * (l + 1) (l the rank's last chunk), what its backward holds at
    once (each piece's call back-propagates and frees its gradients before the next)."""
    L = T / R(x.chunks)
    first = x.last_chunk if largest_piece else x.last_chunk - x.pieces + 1
    reach = sum(k + 1 for k in range(first, x.last_chunk + 1))
    return L * L * reach, L * reach


def causal_mask_elements(tq, shift):
    """Elements of the masks one global causal attention call makes when its tq queries start `shift` keys past
    the first key (shift > 0: SDPA's `is_causal` cannot place the diagonal, runtime/ops_attention.py
    `attention`): blocks of r = `mask_rows`(tq + shift) queries, block i against the keys up to its last query,
        shift*tq + r^2*F*(F + 1)/2 + (tq - F*r)*tq,   F = floor(tq/r) whole blocks
    (tq*(tq + shift) when tq <= r). tq and shift may be sympy expressions in T (a cp piece's queries, offset)."""
    tq, shift = sympy.sympify(tq), sympy.sympify(shift)
    r = mask_rows(tq + shift)
    F = sympy.floor(tq / r)
    return shift * tq + r * r * F * (F + 1) / 2 + (tq - F * r) * tq


def causal_masks(x):
    """Mask elements a global attention's forward saves under context parallelism (SDPA's additive copy of each
    call's mask, shared by the batch and the heads; the boolean mask is freed): piece k of L = T/chunks queries
    attends to the (k + 1)*L keys up to its last token, `causal_mask_elements`(L, k*L). Until this convention
    s*T, which over-counted the balanced split's pieces ((2c + 1)/(4c) of it on the last rank) and left out the
    concatenated output (+0.9% at cp 2, d_model 64; the contiguous split +3.6%)."""
    L = T / R(x.chunks)
    return sum(causal_mask_elements(L, k * L) for k in range(x.last_chunk - x.pieces + 1, x.last_chunk + 1))


def window_masks(c: AttentionConfig, x):
    """Mask elements a windowed attention's forward saves for backward (one [rows, keys] mask per query block,
    shared by the batch and the heads, `window_mask_elements`): one call over the rank's T tokens, or under
    context parallelism one per piece of T/chunks queries, piece k's first query k*T/chunks keys in (the
    traced last rank holds the pieces ending at chunk `last_chunk`)."""
    tq = T / R(x.chunks)
    return sum(window_mask_elements(c.window, tq, k * tq)
               for k in range(x.last_chunk - x.pieces + 1, x.last_chunk + 1))


def _causal_sum(window: int | None, chunk: int | None = None):
    """Keys summed over the T queries: sum_{i=1..T} min(i, W) (T(T+1)/2 for global attention, piecewise-exact
    via Min otherwise); with chunks of C, floor(T/C) full chunks of C(C+1)/2 plus r(r+1)/2 for the r = T mod C
    queries of the last, partial one."""
    if chunk is not None:
        full = sympy.floor(T / chunk)
        r = T - chunk * full  # T mod C, written with floor so the evaluator stays exact
        return full * chunk * (chunk + 1) / 2 + r * (r + 1) / 2
    if window is None:
        return T * (T + 1) / 2
    m = Smallest(T, window)
    return m * (m + 1) / 2 + (T - m) * window


def flops(c: AttentionConfig) -> dict[str, Flops]:
    width = 2 * c.heads * (c.head_dim + c.v_head_dim)
    per_token = T if c.window is None else Smallest(T, c.window)  # decode: the keys of the newest query
    if c.chunk is not None:  # the newest query at position T - 1 sees (T - 1) mod C + 1 keys
        per_token = T - c.chunk * sympy.floor((T - 1) / c.chunk)
    return {"attention": Flops(width * per_token, width * _causal_sum(c.window, c.chunk))}


def dims(c: AttentionConfig) -> str:
    text = f"H={c.heads} Hkv={c.kv_heads} D={c.head_dim}"
    text += f" Dv={c.v_head_dim}" if c.v_head_dim != c.head_dim else ""
    text += f" W={c.window}" if c.window else f" chunk={c.chunk}" if c.chunk else " global"
    text += f" rope={c.rope_theta:g}" if c.rope_theta else " nope"
    if c.rope_scaling is not None:  # e.g. "llama3x8@8192": frequencies scaled for 8x the 8192-token context
        sc = c.rope_scaling
        text += f" {sc.kind}x{sc.factor:g}" + (f"@{sc.original_context}" if sc.original_context else "")
    if c.rope_dim is not None:  # partial rotary embeddings: only the first rope_dim channels of D rotate
        text += f" rope_dim={c.rope_dim}"
    text += " gate" if c.gate else ""
    text += " sinks" if c.sinks else ""
    text += f" softcap={c.softcap:g}" if c.softcap is not None else ""
    text += " qk_l2" if c.qk_l2_norm else ""
    text += f" scale=1/sqrt({c.query_pre_attn_scalar:g})" if c.query_pre_attn_scalar is not None else ""
    if c.scale is not None:
        text += f" scale={c.scale:g}"
    if c.temperature_floor is not None:
        text += f" temperature={c.temperature_scale:g}@{c.temperature_floor}"
    return text


def backward(c: AttentionConfig, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring)."""
    a, tok = x.a, x.tok
    grads = x.split(a * tok * (c.heads + c.kv_heads) * (c.head_dim + c.v_head_dim))
    if not c.plain_softmax:  # the explicit-softmax variant (sinks, soft cap): its fp32 score gradients
        grads += x.split(max(4, a) * x.b * x.s * T * c.heads)
    elif not x.flash_attention:  # the eager core: the last piece's (or the one call's) score gradients
        pairs, keys = eager_reach(x, largest_piece=True)
        grads += x.split(eager_score_gradient_bytes(a) * x.b * pairs * c.heads)
        if x.recompute == "selective" and x.pieces > 1:
            # what selective dropped is live again one piece at a time (each call is its own checkpoint): the
            # last piece's core, where the assembly adds every piece's (stored without recompute less with it)
            grads += eager_core(c, x, pairs, keys) - (stored(c, x, False) - stored(c, x, True))
    q_width = c.heads * c.head_dim * (2 if c.gate else 1)
    weight = x.split(a * tok * c.heads * c.v_head_dim + x.w * x.h * max(q_width, c.heads * c.v_head_dim))
    return Largest(grads, weight)


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
                  "original_context = ...), linear(factor = ...), dynamic(factor = ..., original_context = ...), "
                  "yarn(factor = ..., original_context = ..., ...) or longrope(factor = ..., original_context = ..., "
                  "short_factor = factors(...), long_factor = factors(...)) (default: none = plain RoPE)"),
        Param("rope_dim", "int", nullable=True, min=2,
              doc="channels of each q/k head that RoPE rotates, the first ones; even, at most head_dim "
                  "(default: none = the whole head)"),
        Param("causal", "bool", True),
        Param("qkv_bias", "bool", False),
        Param("out_bias", "bool", False),
        Param("qk_norm", "bool", False, doc="per-head RMSNorm on q and k (Qwen3)"),
        Param("gate", "bool", False, doc="gated output (Qwen3-Next): q_proj also emits a gate, output * sigmoid(gate)"),
        Param("sinks", "bool", False, doc="attention sinks (gpt-oss): a learned logit per head in the softmax"),
        Param("softcap", "float", None, nullable=True, min=1e-9,
              doc="attention-logit soft cap (Gemma-2): scores -> softcap * tanh(scores / softcap) (default: none)"),
        Param("qk_l2_norm", "bool", False, doc="q and k divided by their root mean square per head, no weights "
                                               "(Llama-4)"),
        Param("chunk", "int", None, nullable=True, min=1,
              doc="chunked attention (Llama-4): queries see only the earlier keys of their chunk (default: none)"),
        Param("query_pre_attn_scalar", "float", None, nullable=True, min=1e-9,
              doc="softmax scale query_pre_attn_scalar^-1/2 (Gemma-2/3; default: none = head_dim)"),
        Param("scale", "float", None, nullable=True, min=1e-9,
              doc="attention score scale (default: none = 1/sqrt(head_dim)); Granite's attention_multiplier"),
        Param("temperature_floor", "int", None, nullable=True, min=1,
              doc="query temperature tuning (Llama-4's NoPE layers, floor_scale F): the query at position p is "
                  "multiplied by 1 + temperature_scale * ln(1 + floor((p + 1) / F)) (default: none = off)"),
        Param("temperature_scale", "float", None, nullable=True, min=1e-9,
              doc="the temperature tuning's factor (Llama-4's attn_scale; default 0.1 with temperature_floor)"),
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
    backward=backward,
    flops=flops,
    dims=dims,
    per_use=none_per_use,
)
