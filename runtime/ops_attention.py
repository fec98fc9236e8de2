"""Attention ops: rotary embeddings, the SDPA-backed attention kernel and its plain reference.

Layouts keep the sequence dimension explicit (docs/CONTRACTS.md):
    q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv]  ->  o [B, Tq, H, Dv]
Query i sits at key position Tk - Tq + i (keys end where the queries end), so one call covers full prefill,
chunked prefill over cached keys and decode. A window W lets a query at position p see keys in (p - W, p].

`attention` (torch SDPA) is the fast path; `attention_reference` is its oracle (explicit softmax, repeated
KV heads) and each docstring names the other. `attention_decode` scores one query against unordered cache
slots (a ring buffer); its oracle is `attention_reference` over the same keys in time order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ltmdsl.ir import RopeScaling
from ltmdsl.kinds.attention import mask_rows, rope_attention_factor, window_rows


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (Hugging Face Llama convention: rotate_half, inv_freq = 1/theta^(2i/D)), over the
# whole head or its first R channels (partial rotary: D is then R throughout, as transformers does).
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(D: int, theta: float, scaling: RopeScaling | None, dtype: torch.dtype, device=None,
                  seq_len: int | None = None) -> torch.Tensor:
    """The D/2 rotation frequencies [D/2] in `dtype`: 1/theta^(2i/D), then `scaling` if given.

    Each scaling follows transformers' modeling_rope_utils operation for operation, so in fp32 the frequencies
    are bitwise those of its rotary embeddings (see `RopeScaling` for the formulas):
    llama3 (`_compute_llama3_parameters`), with wavelength 2*pi / inv_freq: frequencies whose wavelength exceeds
    original_context / low_freq_factor are divided by `factor`, those below original_context / high_freq_factor
    are kept, and in between
        smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    linear (`_compute_linear_scaling_rope_parameters`): inv_freq / factor.
    yarn (`_compute_yarn_parameters`): a linear ramp over the correction range blends extrapolation
    (inv_freq) and interpolation (inv_freq / factor); its cos/sin factor is `rope_attention_factor`.
    dynamic (`_compute_dynamic_ntk_parameters`, dynamic NTK): with L = max(seq_len, original_context) the base
    becomes theta * (factor * L / original_context - (factor - 1))^(D / (D - 2)); `seq_len` is the length the
    call reaches (its last position + 1), so below the original context nothing changes.
    longrope (`_compute_longrope_parameters`): 1 / (ext_i * theta^(2i/D)), ext the long factors when the call
    reaches beyond original_context, the short ones otherwise.
    """
    if scaling is not None and scaling.kind == "longrope":  # `_compute_longrope_parameters`
        long = seq_len is not None and seq_len > scaling.original_context
        ext = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32,
                           device=device).to(dtype)  # [D/2]
        shape = torch.arange(0, D, 2, dtype=torch.int64, device=device).to(dtype) / D  # [D/2]
        return 1.0 / (ext * theta**shape)  # [D/2]
    if scaling is not None and scaling.kind == "dynamic":
        M = scaling.original_context
        L = torch.tensor(max(seq_len or M, M), dtype=torch.int64, device=device)
        theta = theta * ((scaling.factor * L / M).to(dtype) - (scaling.factor - 1)) ** (D / (D - 2))  # 0-d tensor
        scaling = None
    i = torch.arange(0, D, 2, dtype=torch.int64, device=device).to(dtype)  # [D/2]
    inv_freq = 1.0 / (theta ** (i / D))  # [D/2]
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "yarn":
        return _yarn_inv_freq(D, theta, scaling, dtype, device)
    if scaling.kind != "llama3":
        raise ValueError(f"unknown rope scaling kind {scaling.kind!r} "
                         "(supported: llama3, linear, yarn, dynamic, longrope)")
    factor, low, high, ctx = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_context
    low_freq_wavelen = ctx / low  # longer wavelengths: divided by factor
    high_freq_wavelen = ctx / high  # shorter wavelengths: unchanged
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # [D/2]
    smooth = (ctx / wavelen - low) / (high - low)  # [D/2], in [0, 1] for the medium band
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # [D/2]
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)  # [D/2]
    return torch.where(medium, smoothed, scaled)  # [D/2]


def _yarn_inv_freq(D: int, theta: float, s: RopeScaling, dtype: torch.dtype, device=None) -> torch.Tensor:
    """YaRN's frequencies [D/2] (Peng et al. 2023, as transformers' `_compute_yarn_parameters`).

    The dimension that turns r times over the original context L is d(r) = D * ln(L / (2*pi*r)) / (2 ln theta);
    lo = d(beta_fast), hi = d(beta_slow) (floored / ceiled when truncating), clamped to [0, D - 1]; the ramp
    (i - lo) / (hi - lo) clamped to [0, 1] takes frequency i from extrapolated (kept) to interpolated (/ factor).
    """
    fast = 32.0 if s.beta_fast is None else s.beta_fast
    slow = 1.0 if s.beta_slow is None else s.beta_slow
    L = s.original_context

    def correction_dim(rotations: float) -> float:
        return (D * math.log(L / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if s.truncate is None or s.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, D - 1)
    if lo == hi:
        hi += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = theta ** (torch.arange(0, D, 2, device=device).to(dtype) / D)  # [D/2]
    extrapolation = 1.0 / pos_freqs  # [D/2]
    interpolation = 1.0 / (s.factor * pos_freqs)  # [D/2]
    ramp = torch.clamp((torch.arange(D // 2, dtype=torch.float32, device=device) - lo) / (hi - lo), 0, 1)  # [D/2]
    keep = (1 - ramp).to(dtype)  # [D/2], 1 where frequencies are extrapolated
    return interpolation * (1 - keep) + extrapolation * keep  # [D/2]


def rope_cos_sin(positions: torch.Tensor, D: int, theta: float, dtype: torch.dtype,
                 scaling: RopeScaling | None = None, seq_len: int | None = None):
    """positions [T] (int) -> (cos, sin) each [T, D] in `dtype`; `scaling` rescales the frequencies.

    Frequencies are computed in fp32 (fp64 for fp64 inputs) and cast, as LlamaRotaryEmbedding does (see
    `rope_inv_freq`); cos and sin are multiplied by the scaling's attention factor (1 except for yarn and
    longrope). Dynamic NTK and LongRoPE take the frequencies of the last position given, as transformers' rotary
    embedding does for a sequence processed left to right (a cached key keeps the rotation of the call that
    wrote it). `seq_len`, the last position + 1, is read off `positions` when not given; callers that know it
    pass it, so that no value is read back from a tensor (fake tensors, for `ltmdsl memory --measure`, have none).
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    by_length = scaling is not None and scaling.kind in ("dynamic", "longrope")
    if not by_length:
        seq_len = None
    elif seq_len is None:
        seq_len = int(positions.max()) + 1
    inv_freq = rope_inv_freq(D, theta, scaling, work, positions.device, seq_len)  # [D/2]
    freqs = positions.to(work)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    factor = rope_attention_factor(scaling)
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [-x2, x1] with x1, x2 the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D], cos/sin [T, R] with R <= D -> x rotated by position, [B, T, H, D].

    The first R channels are rotated and the other D - R pass through unchanged (partial rotary embeddings,
    transformers' `partial_rotary_factor` = R / D as in Bamba, GPT-NeoX and Phi); rotate_half pairs channel
    i with i + R/2 within those R, and `rope_cos_sin(positions, R, ...)` gives frequencies over R, not D.
    """
    R = cos.shape[-1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # [1, T, 1, R]
    if R == x.shape[-1]:
        return x * c + rotate_half(x) * s
    rot, rest = x[..., :R], x[..., R:]  # [B, T, H, R], [B, T, H, D - R]
    return torch.cat((rot * c + rotate_half(rot) * s, rest), dim=-1)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def visibility_mask(Tq: int, Tk: int, *, causal: bool, window: int | None, device,
                    chunk: int | None = None) -> torch.Tensor | None:
    """Boolean [Tq, Tk] mask, True where query i may see key j; None when every key is visible.

    Query i sits at key position p = Tk - Tq + i; causal keeps j <= p, a window W keeps j > p - W, chunks of
    C keep floor(j / C) = floor(p / C) (key 0 must start a chunk).
    """
    if not causal and window is None and chunk is None:
        return None
    p = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)  # [Tq, 1]
    j = torch.arange(Tk, device=device)[None, :]  # [1, Tk]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= p
    if window is not None:
        mask &= j > p - window
    if chunk is not None:
        mask &= j // chunk == p // chunk
    return mask


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------



def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None, scale: float
) -> torch.Tensor:
    """Softmax attention via torch SDPA: q [B,Tq,H,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv] -> [B,Tq,H,Dv].

    GQA/MQA through SDPA's `enable_gqa`; the oracle is `attention_reference`. With a window W the keys before
    the first query's window are dropped, and more than `window_rows`(W) queries (max(W, 128), fewer for a very
    long window) go in blocks of that many, each against only the keys its window can reach, so a long chunk
    costs O(Tq * (block + W)) instead of O(Tq * Tk) and its masks (saved for backward) hold as many elements
    (the memory model's `window_mask_elements`). Causal attention whose queries do not start at key 0 (a
    prefill chunk against cached keys, a window) cannot use SDPA's `is_causal`, whose diagonal starts at the
    top left, and needs an explicit mask, which SDPA turns into an additive copy in the query dtype:
    those calls go in blocks of `mask_rows(Tk)` queries, so a mask holds at most max(Tk, MASK_ELEMENTS)
    elements (1 + a bytes each, a the query's element size) rather than Tq x Tk. Values narrower than the
    queries (MLA's Dv < Dqk) are zero-padded to Dqk, as SDPA's fused kernels need equal head dims (otherwise
    it falls back to its math kernel, which keeps fp32 copies and the scores).
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    Dv = v.shape[-1]
    if Dv < D:  # SDPA's fused kernels need Dv = D: zero-padded values (MLA), the output's first Dv channels
        vp = F.pad(v, (0, D - Dv))  # [B, Tk, Hkv, D]
        return attention(q, k, vp, causal=causal, window=window, scale=scale)[..., :Dv]  # [B, Tq, H, Dv]
    if window is not None:
        reach = Tq + window - 1  # the keys the window lets these queries see: the earlier ones are not read
        if Tk > reach:
            k, v, Tk = k[:, Tk - reach:], v[:, Tk - reach:], reach  # [B, reach, Hkv, D|Dv]
        if Tq > window_rows(window):
            return _by_query_blocks(q, k, v, window_rows(window), causal=causal, window=window, scale=scale)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|Hkv, T, D]
    if causal and window is None and Tq == Tk:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=H != Hkv)
    elif causal and Tq > mask_rows(Tk):  # a mask is needed: bound its rows
        return _by_query_blocks(q, k, v, mask_rows(Tk), causal=causal, window=window, scale=scale)
    else:
        mask = visibility_mask(Tq, Tk, causal=causal, window=window, device=q.device)  # [Tq, Tk] | None
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
    return o.transpose(1, 2)  # [B, Tq, H, Dv]


def _by_query_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blk: int, *, causal: bool,
                     window: int | None, scale: float) -> torch.Tensor:
    """`attention` over blocks of `blk` queries, each against only the keys it can see (those up to its last
    query, and within the window): q [B,Tq,H,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv] -> [B,Tq,H,Dv], written block
    by block into one output, so no [Tq, Tk] mask or list of partial outputs ever exists at once."""
    B, Tq, H, _ = q.shape
    shift = k.shape[1] - Tq
    out = q.new_empty(B, Tq, H, v.shape[-1])  # [B, Tq, H, Dv]
    for q0 in range(0, Tq, blk):
        q1 = min(q0 + blk, Tq)
        k0 = 0 if window is None else max(0, shift + q0 - window + 1)
        k1 = shift + q1  # keys ending where this block's queries end
        out[:, q0:q1] = attention(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], causal=causal, window=window, scale=scale)
    return out


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None, scale: float
) -> torch.Tensor:
    """The plain oracle of `attention` (same signature): repeat KV heads, explicit masked softmax."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    kr = k.repeat_interleave(G, dim=2)  # [B, Tk, H, D]
    vr = v.repeat_interleave(G, dim=2)  # [B, Tk, H, Dv]
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale  # [B, H, Tq, Tk]
    mask = visibility_mask(Tq, Tk, causal=causal, window=window, device=q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float() if s.dtype != torch.float64 else s, dim=-1).to(v.dtype)  # [B, H, Tq, Tk]
    return torch.einsum("bhqk,bkhd->bqhd", p, vr)  # [B, Tq, H, Dv]


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, n_valid: int, scale: float
) -> torch.Tensor:
    """One query per sequence over cache slots [0, n_valid): q [B,H,D], k_cache [B,S,Hkv,D],
    v_cache [B,S,Hkv,Dv] -> [B,H,Dv].

    Slots may be in any order (a ring buffer): RoPE was applied when keys were written and a window is
    enforced by the ring's size, so no mask is needed. Oracle: `attention_reference` with Tq = 1.
    """
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    G = H // Hkv
    k = k_cache[:, :n_valid]  # [B, S', Hkv, D]
    v = v_cache[:, :n_valid]  # [B, S', Hkv, Dv]
    qg = q.view(B, Hkv, G, D)  # [B, Hkv, G, D]
    s = torch.einsum("bhgd,bshd->bhgs", qg, k) * scale  # [B, Hkv, G, S']
    p = torch.softmax(s.float() if s.dtype != torch.float64 else s, dim=-1).to(v.dtype)
    o = torch.einsum("bhgs,bshd->bhgd", p, v)  # [B, Hkv, G, Dv]
    return o.reshape(B, H, v.shape[-1])


# ---------------------------------------------------------------------------------------------
# Variants the SDPA kernels cannot express: attention sinks (gpt-oss), logit soft caps (Gemma-2), chunks
# (Llama-4). Explicit scores, in fp32 (fp64 for fp64 inputs).
# ---------------------------------------------------------------------------------------------


def _softmax_with_variants(s: torch.Tensor, mask: torch.Tensor | None, softcap: float | None,
                           sinks: torch.Tensor | None) -> torch.Tensor:
    """scores s [B, H, Tq, Tk] (scaled) -> probabilities [B, H, Tq, Tk] in s's dtype.

    softcap: s -> softcap * tanh(s / softcap), before the mask (Gemma2Attention). sinks [H]: one more logit per
    head in every row's denominator, whose probability is dropped (GptOssAttention):
        p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k))
    """
    if not (torch.is_grad_enabled() and s.requires_grad):  # inference: in place, one score tensor held
        return _softmax_with_variants_(s, mask, softcap, sinks)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.softmax(s, dim=-1)
    sink = sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:3], 1)  # [B, H, Tq, 1]
    both = torch.cat([s, sink], dim=-1)  # [B, H, Tq, Tk + 1]
    both = both - both.amax(dim=-1, keepdim=True)
    return torch.softmax(both, dim=-1)[..., :-1]  # [B, H, Tq, Tk]


def _softmax_with_variants_(s: torch.Tensor, mask: torch.Tensor | None, softcap: float | None,
                            sinks: torch.Tensor | None) -> torch.Tensor:
    """`_softmax_with_variants` in place, where no gradient flows (inference): s becomes the probabilities, so a
    query block holds one score tensor (the out-of-place form holds the capped or masked copy, the row with the
    sink, its shifted copy and the softmax: four, 16 bytes a score in fp32)."""
    if softcap is not None:
        s.div_(softcap).tanh_().mul_(softcap)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)  # [B, H, Tq, 1]
    if sinks is not None:
        top = torch.maximum(top, sinks.to(s.dtype)[None, :, None, None])
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # rows with nothing visible stay 0
    s.sub_(top).exp_()
    den = s.sum(dim=-1, keepdim=True)  # [B, H, Tq, 1]
    if sinks is not None:
        den = den + torch.exp(sinks.to(s.dtype)[None, :, None, None] - top)
    return s.div_(den)


def attention_variant(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None, chunk: int | None,
    scale: float, softcap: float | None, sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention with sinks, a soft cap or chunks: q [B,Tq,H,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv] -> [B,Tq,H,Dv].

    Queries end where the keys end (as `attention`); with chunks, key 0 must start a chunk. Explicit scores per
    query block of 256, so memory is O(256 * Tk) per head. The oracle is the float64 token loop of the tests
    (tests/runtime/test_rt_attention_variants.py) and transformers' GptOssAttention / Gemma2Attention.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kr = k.repeat_interleave(H // Hkv, dim=2).to(work)  # [B, Tk, H, D]
    vr = v.repeat_interleave(H // Hkv, dim=2).to(work)  # [B, Tk, H, Dv]
    full = visibility_mask(Tq, Tk, causal=causal, window=window, chunk=chunk, device=q.device)  # [Tq, Tk] | None
    outs = []
    for q0 in range(0, Tq, 256):
        q1 = min(q0 + 256, Tq)
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, q0:q1].to(work), kr)  # [B, H, q1-q0, Tk]
        s = s.mul_(scale) if not (torch.is_grad_enabled() and s.requires_grad) else s * scale
        p = _softmax_with_variants(s, None if full is None else full[q0:q1], softcap, sinks)
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, vr))  # [B, q1-q0, H, Dv]
    return torch.cat(outs, dim=1).to(q.dtype)  # [B, Tq, H, Dv]


def attention_variant_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, n_valid: int, scale: float,
    softcap: float | None, sinks: torch.Tensor | None,
) -> torch.Tensor:
    """`attention_decode` with a soft cap and sinks: q [B,H,D] over slots [0, n_valid) -> [B,H,Dv].

    Slots may be in any order (a ring); the cache's size enforces a window, and for chunks the first n_valid
    slots are the current chunk. Oracle: `attention_variant` with Tq = 1 over the same keys in time order.
    """
    o = attention_variant(q[:, None], k_cache[:, :n_valid], v_cache[:, :n_valid], causal=False, window=None,
                          chunk=None, scale=scale, softcap=softcap, sinks=sinks)  # [B, 1, H, Dv]
    return o[:, 0]  # [B, H, Dv]
