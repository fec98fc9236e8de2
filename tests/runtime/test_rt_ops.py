"""Kernels against their oracles: chunked scans vs token loops in fp64, SDPA attention vs
the explicit-softmax reference, conv vs a tap loop, and every one-token step vs its sequence form.

Tolerances: fp64 comparisons 1e-10 (same math, different association); fp32 vs fp64 oracle 1e-4.
Inputs are seeded random, lengths odd (1, 63, 65, 127), decays well conditioned (dt = softplus(randn - 4)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from ltmdsl.ir import RopeScaling
from ltmdsl.runtime import ops_attention as att
from ltmdsl.runtime import ops_conv, ops_scan, ops_ssd
from ltmdsl.runtime.kernels import TORCH_KERNELS, Kernels, UnknownOpError

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def test_kernels_is_frozen_and_complete():
    names = {"attention", "attention_decode", "causal_conv1d", "conv_step", "selective_scan", "selective_step",
             "ssd_scan", "ssd_step", "add_rmsnorm"}
    assert names <= TORCH_KERNELS.names()
    with pytest.raises(Exception):
        TORCH_KERNELS.attention = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        TORCH_KERNELS.ops["attention"] = None  # type: ignore[index]


def test_unknown_op_is_a_loud_error():
    with pytest.raises(AttributeError, match="no runtime kind declares the kernel op 'gated_delta_rule'"):
        TORCH_KERNELS.gated_delta_rule
    with pytest.raises(UnknownOpError, match="'gated_delta_rule'"):
        TORCH_KERNELS["gated_delta_rule"]
    with pytest.raises(UnknownOpError, match="cannot override"):
        TORCH_KERNELS.override("fast", {"gated_delta_rule": lambda x: x})


def test_override_replaces_only_the_named_ops():
    fast = TORCH_KERNELS.override("fast", {"conv_step": ops_scan.selective_step})
    assert fast.name == "fast" and fast.names() == TORCH_KERNELS.names()
    assert fast.conv_step is ops_scan.selective_step and fast.provider("conv_step") == "fast"
    assert fast.attention is TORCH_KERNELS.attention and fast.provider("attention") == "torch"
    assert TORCH_KERNELS.conv_step is ops_conv.conv_step  # the reference bundle is unchanged
    with pytest.raises(TypeError, match="not callable"):
        Kernels("bad", {"attention": 3})


# ---- attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (63, 63), (65, 65), (5, 70), (1, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("window", [None, 16], ids=["global", "w16"])
def test_attention_sdpa_matches_reference(Tq, Tk, H, Hkv, window):
    g = gen(1)
    q, k, v = randn(2, Tq, H, 8, g=g), randn(2, Tk, Hkv, 8, g=g), randn(2, Tk, Hkv, 6, g=g)
    out = att.attention(q, k, v, causal=True, window=window, scale=8**-0.5)
    ref = att.attention_reference(q, k, v, causal=True, window=window, scale=8**-0.5)
    assert out.shape == (2, Tq, H, 6)
    assert_close(out, ref, 1e-10, "sdpa vs reference")


@pytest.mark.parametrize("Tq,Tk,W", [(700, 700, 16), (600, 615, 16), (520, 900, 200)], ids=["prefill", "chunk", "wide"])
def test_blocked_window_attention_matches_reference(Tq, Tk, W):
    """Long windowed calls take the query-blocked path; it must equal the one-mask reference."""
    g = gen(16)
    q, k, v = randn(1, Tq, 2, 4, g=g), randn(1, Tk, 1, 4, g=g), randn(1, Tk, 1, 4, g=g)
    out = att.attention(q, k, v, causal=True, window=W, scale=0.5)
    assert_close(out, att.attention_reference(q, k, v, causal=True, window=W, scale=0.5), 1e-10, "blocked")


@pytest.mark.parametrize("Tq,Tk,window", [(300, 300, 40), (300, 700, None), (257, 1000, None), (300, 800, 40)],
                         ids=["window-prefill", "chunk-on-cache", "one-past-a-block", "window-chunk"])
def test_masked_attention_goes_in_query_blocks_and_matches_reference(Tq, Tk, window, monkeypatch):
    """A causal call whose queries do not start at key 0 takes `mask_rows(keys)` queries per SDPA call (a small
    MASK_ELEMENTS forces fewer rows than QUERY_BLOCK); every mask stays within MASK_ELEMENTS and the result equals
    the one-mask float64 reference (1e-10)."""
    from ltmdsl.kinds import attention as kind

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2], kw.get("attn_mask")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(att.F, "scaled_dot_product_attention", counting)
    monkeypatch.setattr(kind, "MASK_ELEMENTS", 100 * Tk)  # 100 rows per call over all Tk keys
    g = gen(17)
    q, k, v = randn(1, Tq, 4, 8, g=g), randn(1, Tk, 2, 8, g=g), randn(1, Tk, 2, 6, g=g)
    out = att.attention(q, k, v, causal=True, window=window, scale=8**-0.5)
    assert_close(out, att.attention_reference(q, k, v, causal=True, window=window, scale=8**-0.5), 1e-10, "blocked")
    masks = [m for _, _, m in calls if m is not None]
    assert masks and all(m.numel() <= max(100 * Tk, m.shape[1]) for m in masks)  # never a [Tq, Tk] mask
    assert sum(tq for tq, _, _ in calls) == Tq


def test_mask_rows_bound_the_mask():
    from ltmdsl.kinds.attention import MASK_ELEMENTS, QUERY_BLOCK, mask_rows

    assert mask_rows(1000) == QUERY_BLOCK
    assert mask_rows(MASK_ELEMENTS // 8) == 8
    assert mask_rows(10 * MASK_ELEMENTS) == 1  # one row at least, however many keys


def test_attention_reference_masks_by_hand():
    """The reference's window semantics, checked against a per-query loop: query p sees keys (p - W, p]."""
    g = gen(2)
    T, W = 20, 5
    q, k, v = randn(1, T, 2, 4, g=g), randn(1, T, 1, 4, g=g), randn(1, T, 1, 4, g=g)
    out = att.attention_reference(q, k, v, causal=True, window=W, scale=0.5)
    for p in range(T):
        lo = max(0, p - W + 1)
        s = torch.einsum("hd,kd->hk", q[0, p], k[0, lo : p + 1, 0]) * 0.5  # [H, keys]
        o = torch.softmax(s, -1) @ v[0, lo : p + 1, 0]  # [H, Dv]
        assert_close(out[0, p], o, 1e-12, f"query {p}")


def test_attention_noncausal_sees_everything():
    g = gen(3)
    q, k, v = randn(1, 7, 2, 4, g=g), randn(1, 7, 2, 4, g=g), randn(1, 7, 2, 4, g=g)
    out = att.attention(q, k, v, causal=False, window=None, scale=0.5)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
    assert_close(out, torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), 1e-12, "non-causal")


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa2", "mqa"])
def test_attention_decode_over_shuffled_slots(H, Hkv):
    """A ring buffer's slots are unordered: decode must not care about slot order."""
    g = gen(4)
    S, n = 12, 9
    q, k, v = randn(2, H, 8, g=g), randn(2, S, Hkv, 8, g=g), randn(2, S, Hkv, 5, g=g)
    out = att.attention_decode(q, k, v, n_valid=n, scale=0.3)
    ref = att.attention_reference(q[:, None], k[:, :n], v[:, :n], causal=False, window=None, scale=0.3)[:, 0]
    assert_close(out, ref, 1e-12, "decode")
    perm = torch.randperm(n, generator=g)
    kp, vp = k.clone(), v.clone()
    kp[:, :n], vp[:, :n] = k[:, perm], v[:, perm]
    assert_close(att.attention_decode(q, kp, vp, n_valid=n, scale=0.3), ref, 1e-12, "decode, shuffled")


def test_rope_matches_pairwise_rotation():
    """rotate_half convention: dims (i, i + D/2) rotate by angle pos * theta^(-2i/D)."""
    g = gen(5)
    D, theta = 8, 10000.0
    x = randn(1, 6, 3, D, g=g)
    pos = torch.arange(10, 16)
    cos, sin = att.rope_cos_sin(pos, D, theta, F64)
    out = att.apply_rope(x, cos, sin)
    for t in range(6):
        for i in range(D // 2):
            ang = pos[t].item() * theta ** (-2 * i / D)
            a, b = x[0, t, :, i], x[0, t, :, i + D // 2]
            c, s = torch.tensor(ang, dtype=F64).cos(), torch.tensor(ang, dtype=F64).sin()
            assert_close(out[0, t, :, i], a * c - b * s, 1e-12, "rope first half")
            assert_close(out[0, t, :, i + D // 2], b * c + a * s, 1e-12, "rope second half")


def test_partial_rope_rotates_the_first_channels_only():
    """rope_dim R < D: dims (i, i + R/2) for i < R/2 rotate by pos * theta^(-2i/R) (frequencies over R, not D),
    dims R..D pass through bit for bit; R = D is plain RoPE."""
    g = gen(6)
    D, R, theta = 12, 4, 100.0
    x = randn(2, 5, 3, D, g=g)
    pos = torch.arange(7, 12)
    cos, sin = att.rope_cos_sin(pos, R, theta, F64)  # [T, R]
    assert cos.shape == (5, R)
    out = att.apply_rope(x, cos, sin)  # [B, T, H, D]
    assert torch.equal(out[..., R:], x[..., R:])
    for t in range(5):
        for i in range(R // 2):
            ang = torch.tensor(pos[t].item() * theta ** (-2 * i / R), dtype=F64)
            a, b = x[:, t, :, i], x[:, t, :, i + R // 2]
            assert_close(out[:, t, :, i], a * ang.cos() - b * ang.sin(), 1e-12, "partial rope first half")
            assert_close(out[:, t, :, i + R // 2], b * ang.cos() + a * ang.sin(), 1e-12, "partial rope second half")
    full = att.rope_cos_sin(pos, D, theta, F64)
    assert_close(att.apply_rope(x, *full), x * full[0][None, :, None] + att.rotate_half(x) * full[1][None, :, None],
                 1e-15, "R = D")


def test_llama3_rope_scaling_bands():
    """llama3 scaling by its definition, in fp64: with wavelength L = 2*pi / inv_freq, L < ctx / high keeps the
    frequency, L > ctx / low divides it by factor, and in between it is the smooth mix of the two; factor 1
    changes nothing. D = 16, theta 1e4 and ctx 32 (thresholds 8 and 32) put frequencies in all three bands."""
    D, theta = 16, 10000.0
    scaling = RopeScaling("llama3", 4.0, 1.0, 4.0, 32)
    plain = att.rope_inv_freq(D, theta, None, F64)  # [D/2]
    scaled = att.rope_inv_freq(D, theta, scaling, F64)  # [D/2]
    bands = []
    for f, g in zip(plain.tolist(), scaled.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 32 / 4:
            bands.append("high")
            assert g == f
        elif wavelen > 32 / 1:
            bands.append("low")
            assert abs(g - f / 4) <= 1e-15 * f
        else:
            bands.append("medium")
            smooth = (32 / wavelen - 1) / (4 - 1)
            assert abs(g - ((1 - smooth) * f / 4 + smooth * f)) <= 1e-15 * f and f / 4 < g < f
    assert {"high", "medium", "low"} <= set(bands), bands
    unit = att.rope_inv_freq(D, theta, RopeScaling("llama3", 1.0, 1.0, 4.0, 32), F64)
    assert_close(unit, plain, 1e-15, "factor 1 is plain RoPE")
    pos = torch.arange(40)
    cos, sin = att.rope_cos_sin(pos, D, theta, F64, scaling)  # [T, D]
    angle = pos.to(F64)[:, None] * scaled[None, :]  # [T, D/2]
    assert_close(cos, torch.cat([angle, angle], -1).cos(), 1e-15, "cos of scaled angles")
    assert_close(sin, torch.cat([angle, angle], -1).sin(), 1e-15, "sin of scaled angles")


# ---- conv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 3, 63])
@pytest.mark.parametrize("with_prev", [False, True], ids=["zeros", "prev"])
def test_causal_conv1d_matches_tap_loop(T, with_prev):
    g = gen(6)
    C, K = 10, 4
    x, w, b = randn(2, T, C, g=g), randn(C, K, g=g), randn(C, g=g)
    prev = randn(2, C, K - 1, g=g) if with_prev else None
    out = ops_conv.causal_conv1d(x, w, b, prev=prev, silu=True)
    ref = ops_conv.causal_conv1d_reference(x, w, b, prev=prev, silu=True)
    assert_close(out, ref, 1e-12, "conv")


def test_conv_step_sequence_equals_conv():
    g = gen(7)
    C, K, T = 6, 4, 11
    x, w, b = randn(2, T, C, g=g), randn(C, K, g=g), randn(C, g=g)
    state = torch.zeros(2, C, K, dtype=F64)
    ys = torch.stack([ops_conv.conv_step(x[:, t], state, w, b, silu=False) for t in range(T)], dim=1)
    assert_close(ys, ops_conv.causal_conv1d_reference(x, w, b, prev=None, silu=False), 1e-12, "conv steps")
    assert_close(state, x[:, -K:].transpose(1, 2), 0, "state holds the last K inputs")


# ---- Mamba-1 selective scan -----------------------------------------------------------------


def scan_inputs(Bsz, T, Di, N, g, dtype=F64):
    u = randn(Bsz, T, Di, g=g, dtype=dtype)
    delta = F.softplus(randn(Bsz, T, Di, g=g) - 4).to(dtype)
    A = -torch.exp(randn(Di, N, g=g) * 0.5).to(dtype)
    return u, delta, A, randn(Bsz, T, N, g=g, dtype=dtype), randn(Bsz, T, N, g=g, dtype=dtype)


@pytest.mark.parametrize("T", [1, 63, 65, 127])
@pytest.mark.parametrize("chunk", [16, 7])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "given-state"])
def test_selective_scan_chunked_matches_token_loop(T, chunk, init):
    g = gen(8)
    u, delta, A, Bm, Cm = scan_inputs(2, T, 6, 5, g)
    h0 = randn(2, 6, 5, g=g) if init else None
    y, h = ops_scan.selective_scan(u, delta, A, Bm, Cm, state=h0, chunk=chunk)
    y_ref, h_ref = ops_scan.selective_scan_reference(u, delta, A, Bm, Cm, state=h0)
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(h, h_ref, 1e-10, "final state")


def test_selective_scan_survives_large_decays():
    """delta * A of -60 per token would overflow an exp(-cumsum) formulation; the scan multiplies decays only."""
    g = gen(9)
    u, delta, A, Bm, Cm = scan_inputs(1, 40, 4, 3, g)
    delta = delta + 3.0
    A = A * 20
    y, h = ops_scan.selective_scan(u, delta, A, Bm, Cm, state=None, chunk=32)
    y_ref, h_ref = ops_scan.selective_scan_reference(u, delta, A, Bm, Cm, state=None)
    assert_close(y, y_ref, 1e-10, "y with strong decay")


def test_selective_scan_fp32_vs_fp64_oracle():
    g = gen(10)
    u, delta, A, Bm, Cm = scan_inputs(2, 65, 8, 4, g)
    y, _ = ops_scan.selective_scan(u.float(), delta.float(), A.float(), Bm.float(), Cm.float(), state=None)
    y_ref, _ = ops_scan.selective_scan_reference(u, delta, A, Bm, Cm, state=None)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, 1e-4, "fp32 scan")


def test_selective_step_sequence_equals_scan():
    g = gen(11)
    u, delta, A, Bm, Cm = scan_inputs(2, 9, 6, 5, g)
    state = randn(2, 6, 5, g=g)
    y_ref, h_ref = ops_scan.selective_scan_reference(u, delta, A, Bm, Cm, state=state)
    ys = [ops_scan.selective_step(u[:, t], delta[:, t], A, Bm[:, t], Cm[:, t], state) for t in range(9)]
    assert_close(torch.stack(ys, 1), y_ref, 1e-12, "steps")
    assert_close(state, h_ref, 1e-12, "state after steps")


# ---- Mamba-2 SSD ----------------------------------------------------------------------------


def ssd_inputs(Bsz, T, Hs, P, G, N, g, dtype=F64):
    x = randn(Bsz, T, Hs, P, g=g, dtype=dtype)
    dt = F.softplus(randn(Bsz, T, Hs, g=g) - 4).to(dtype)
    A = -torch.exp(randn(Hs, g=g)).to(dtype)
    return x, dt, A, randn(Bsz, T, G, N, g=g, dtype=dtype), randn(Bsz, T, G, N, g=g, dtype=dtype)


@pytest.mark.parametrize("T", [1, 63, 65, 127])
@pytest.mark.parametrize("chunk", [16, 5])
@pytest.mark.parametrize("G", [1, 2], ids=["groups1", "groups2"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "given-state"])
def test_ssd_scan_chunked_matches_token_loop(T, chunk, G, init):
    g = gen(12)
    x, dt, A, Bm, Cm = ssd_inputs(2, T, 4, 3, G, 5, g)
    h0 = randn(2, 4, 3, 5, g=g) if init else None
    y, h = ops_ssd.ssd_scan(x, dt, A, Bm, Cm, chunk=chunk, state=h0)
    y_ref, h_ref = ops_ssd.ssd_scan_reference(x, dt, A, Bm, Cm, state=h0)
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(h, h_ref, 1e-10, "final state")


def test_ssd_fp32_vs_fp64_oracle():
    g = gen(13)
    x, dt, A, Bm, Cm = ssd_inputs(2, 127, 4, 8, 1, 16, g)
    y, _ = ops_ssd.ssd_scan(x.float(), dt.float(), A.float(), Bm.float(), Cm.float(), chunk=32, state=None)
    y_ref, _ = ops_ssd.ssd_scan_reference(x, dt, A, Bm, Cm, state=None)
    assert_close(y, y_ref, 1e-4, "fp32 ssd")


def test_ssd_step_sequence_equals_scan():
    g = gen(14)
    x, dt, A, Bm, Cm = ssd_inputs(2, 9, 4, 3, 2, 5, g)
    state = randn(2, 4, 3, 5, g=g)
    y_ref, h_ref = ops_ssd.ssd_scan_reference(x, dt, A, Bm, Cm, state=state)
    ys = [ops_ssd.ssd_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], state) for t in range(9)]
    assert_close(torch.stack(ys, 1), y_ref, 1e-12, "steps")
    assert_close(state, h_ref, 1e-12, "state after steps")


# ---- norms ----------------------------------------------------------------------------------


def test_add_rmsnorm_contract():
    g = gen(15)
    x, r, w = randn(3, 5, 16, g=g), randn(3, 5, 16, g=g), randn(16, g=g)
    normed, summed = TORCH_KERNELS.add_rmsnorm(x, r, w, eps=1e-6)
    s = x + r
    assert_close(summed, s, 0, "summed")
    assert_close(normed, s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w, 1e-12, "normed")
    normed2, summed2 = TORCH_KERNELS.add_rmsnorm(x, None, w, eps=1e-6)
    assert_close(summed2, x, 0, "no residual")
