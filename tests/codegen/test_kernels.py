"""Generated kernels in the Triton interpreter against their PyTorch oracles (ltmdsl.runtime ops).

Oracles run in float64 on the same inputs (bf16 cases: on the bf16-rounded inputs). Outputs and scratch
start as NaN (ops.poisoned), so an element a kernel forgets to write fails the finite check in
assert_close. fp32 <= 1e-4 relative, bf16 <= 1e-2; the delta rule, whose kernels compute in fp32
throughout, fp32 <= 1e-5 (measured about 3e-7 against the float64 token loop).
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from ltmdsl.codegen import ops
from ltmdsl.runtime import ops_attention as RA
from ltmdsl.runtime import ops_conv as RC
from ltmdsl.runtime import ops_delta as RG
from ltmdsl.runtime import ops_norm as RN
from ltmdsl.runtime import ops_scan as RS
from ltmdsl.runtime import ops_ssd as RD

FP32 = 1e-4
BF16 = 1e-2


@pytest.fixture(autouse=True)
def _poison():
    with ops.poisoned():
        yield


def d64(*ts):
    return [None if t is None else t.double() for t in ts]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

ATTN = [
    # id: B, Tq, Tk, H, Hkv, D, Dv, causal, window
    pytest.param(1, 1, 1, 2, 2, 64, 64, True, None, id="T1-mha"),
    pytest.param(1, 63, 63, 4, 2, 64, 64, True, None, id="T63-gqa2"),
    pytest.param(2, 65, 65, 4, 1, 64, 64, True, 17, id="T65-gqa4-window17"),
    pytest.param(1, 5, 70, 4, 2, 128, 128, True, None, id="chunk5-of-70-d128"),
    pytest.param(1, 33, 33, 8, 2, 80, 80, False, None, id="noncausal-d80-padded"),
    pytest.param(1, 17, 17, 3, 1, 32, 48, True, None, id="gqa3-padded-group-dv48"),
    pytest.param(1, 65, 65, 2, 1, 16, 16, True, 1, id="window1"),
]


@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,Dv,causal,window", ATTN)
def test_attention_fp32(B, Tq, Tk, H, Hkv, D, Dv, causal, window):
    g = gen(Tq * 7 + H)
    q, k, v = torch.randn(B, Tq, H, D, generator=g), torch.randn(B, Tk, Hkv, D, generator=g), \
        torch.randn(B, Tk, Hkv, Dv, generator=g)
    out = ops.attention(q, k, v, causal=causal, window=window, scale=D ** -0.5)
    ref = RA.attention_reference(*d64(q, k, v), causal=causal, window=window, scale=D ** -0.5)
    assert_close(out, ref, FP32, "attention")


def test_attention_window_never_reads_dead_key_blocks():
    """Keys older than every query's window are NaN: visiting their blocks would poison the output."""
    B, Tq, Tk, H, Hkv, D, W = 1, 5, 200, 4, 2, 32, 8
    g = gen(3)
    q, k, v = torch.randn(B, Tq, H, D, generator=g), torch.randn(B, Tk, Hkv, D, generator=g), \
        torch.randn(B, Tk, Hkv, D, generator=g)
    dead = Tk - Tq - W - 64  # a full key block before the oldest visible key
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :dead] = float("nan")
    v_bad[:, :dead] = float("nan")
    out = ops.attention(q, k_bad, v_bad, causal=True, window=W, scale=0.2)
    ref = RA.attention_reference(*d64(q, k, v), causal=True, window=W, scale=0.2)
    assert_close(out, ref, FP32, "windowed attention")


def test_attention_bf16_and_strided_inputs():
    B, T, H, Hkv, D = 1, 65, 4, 2, 64
    g = gen(5)
    qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g).bfloat16()  # q, k, v as views of one tensor
    q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    out = ops.attention(q, k, v, causal=True, window=None, scale=D ** -0.5)
    assert out.dtype == torch.bfloat16
    ref = RA.attention_reference(*d64(q, k, v), causal=True, window=None, scale=D ** -0.5)
    assert_close(out, ref, BF16, "bf16 attention")


DECODE = [
    # B, S, n_valid, H, Hkv, D
    pytest.param(2, 100, 77, 4, 2, 64, id="gqa2-partial-cache"),
    pytest.param(1, 64, 1, 8, 2, 128, id="one-slot-d128"),
    pytest.param(1, 130, 130, 2, 2, 80, id="full-ring-d80"),
    pytest.param(1, 65, 63, 4, 1, 16, id="mqa-d16"),
]


@pytest.mark.parametrize("B,S,n_valid,H,Hkv,D", DECODE)
def test_attention_decode_fp32(B, S, n_valid, H, Hkv, D):
    g = gen(S + H)
    q = torch.randn(B, H, D, generator=g)
    k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    ref = RA.attention_decode(*d64(q, k, v), n_valid=n_valid, scale=D ** -0.5)
    k[:, n_valid:] = float("nan")  # slots past n_valid must never be read into the result
    v[:, n_valid:] = float("nan")
    out = ops.attention_decode(q, k, v, n_valid=n_valid, scale=D ** -0.5)
    assert_close(out, ref, FP32, "decode attention")


def test_attention_decode_bf16():
    g = gen(11)
    q, k, v = (torch.randn(2, 4, 64, generator=g).bfloat16(), torch.randn(2, 90, 2, 64, generator=g).bfloat16(),
               torch.randn(2, 90, 2, 64, generator=g).bfloat16())
    out = ops.attention_decode(q, k, v, n_valid=81, scale=0.125)
    assert_close(out, RA.attention_decode(*d64(q, k, v), n_valid=81, scale=0.125), BF16, "bf16 decode")


# ---------------------------------------------------------------------------------------------
# causal conv
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("with_bias,with_prev,silu", [(True, True, True), (False, False, False)],
                         ids=["bias-prev-silu", "plain"])
def test_causal_conv1d(T, with_bias, with_prev, silu):
    g = gen(T)
    B, C, K = 2, 40, 4
    x, w = torch.randn(B, T, C, generator=g), torch.randn(C, K, generator=g)
    b = torch.randn(C, generator=g) if with_bias else None
    prev = torch.randn(B, C, K - 1, generator=g) if with_prev else None
    out = ops.causal_conv1d(x, w, b, prev=prev, silu=silu)
    ref = RC.causal_conv1d_reference(*d64(x, w), None if b is None else b.double(),
                                     prev=None if prev is None else prev.double(), silu=silu)
    assert_close(out, ref, FP32, "causal conv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_step_updates_state(dtype):
    g = gen(2)
    B, C, K = 2, 40, 4
    x, w, b = torch.randn(B, C, generator=g), torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    state = torch.randn(B, C, K, generator=g)
    x, w, b, state = x.to(dtype), w.to(dtype), b.to(dtype), state.to(dtype)
    ref_state = state.double().clone()
    ref = RC.conv_step(*d64(x), ref_state, *d64(w, b), silu=True)
    out = ops.conv_step(x, state, w, b, silu=True)
    tol = FP32 if dtype == torch.float32 else BF16
    assert_close(out, ref, tol, "conv step")
    assert_close(state, ref_state, tol, "conv state")


def test_conv_bf16_matches_fp32_kernel_path():
    g = gen(4)
    x, w = torch.randn(1, 65, 48, generator=g).bfloat16(), torch.randn(48, 4, generator=g).bfloat16()
    out = ops.causal_conv1d(x, w, None, prev=None, silu=True)
    assert out.dtype == torch.bfloat16
    assert_close(out, RC.causal_conv1d_reference(*d64(x, w), None, prev=None, silu=True), BF16, "bf16 conv")


# ---------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# ---------------------------------------------------------------------------------------------

def _mamba1_inputs(B, T, Di, N, seed):
    g = gen(seed)
    u = torch.randn(B, T, Di, generator=g)
    delta = F.softplus(torch.randn(B, T, Di, generator=g) - 1)
    A = -torch.rand(Di, N, generator=g) - 0.5
    return u, delta, A, torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)


@pytest.mark.parametrize("T", [1, 63, 65])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_selective_scan(T, with_state):
    B, Di, N = 2, 40, 16
    u, delta, A, Bm, Cm = _mamba1_inputs(B, T, Di, N, T)
    state = torch.randn(B, Di, N, generator=gen(1)) if with_state else None
    y, final = ops.selective_scan(u, delta, A, Bm, Cm, state=state)
    y_ref, final_ref = RS.selective_scan_reference(*d64(u, delta, A, Bm, Cm),
                                                   state=None if state is None else state.double())
    assert final.dtype == torch.float32
    assert_close(y, y_ref, FP32, "selective scan y")
    assert_close(final, final_ref, FP32, "selective scan state")


def test_selective_scan_bf16_and_step():
    B, T, Di, N = 1, 33, 40, 8
    u, delta, A, Bm, Cm = _mamba1_inputs(B, T, Di, N, 9)
    ub, db, Bb, Cb = u.bfloat16(), delta.bfloat16(), Bm.bfloat16(), Cm.bfloat16()
    y, final = ops.selective_scan(ub, db, A, Bb, Cb, state=None)
    y_ref, final_ref = RS.selective_scan_reference(*d64(ub, db, A, Bb, Cb), state=None)
    assert_close(y, y_ref, BF16, "bf16 selective scan")
    # step: one more token on top of the scan's state, in place
    state, ref_state = final.clone(), final_ref.clone()
    y1 = ops.selective_step(u[:, 0], delta[:, 0], A, Bm[:, 0], Cm[:, 0], state)
    y1_ref = RS.selective_step(*d64(u[:, 0], delta[:, 0], A, Bm[:, 0], Cm[:, 0]), ref_state)
    assert_close(y1, y1_ref, BF16, "selective step y")
    assert_close(state, ref_state, BF16, "selective step state")


# ---------------------------------------------------------------------------------------------
# Mamba-2 SSD
# ---------------------------------------------------------------------------------------------

def _ssd_inputs(B, T, Hs, P, G, N, seed):
    g = gen(seed)
    x = torch.randn(B, T, Hs, P, generator=g)
    dt = F.softplus(torch.randn(B, T, Hs, generator=g) - 1)
    A = -torch.rand(Hs, generator=g) - 0.5
    return x, dt, A, torch.randn(B, T, G, N, generator=g), torch.randn(B, T, G, N, generator=g)


@pytest.mark.parametrize("T,G,chunk", [(1, 1, 16), (63, 2, 16), (65, 4, 32)], ids=["T1-G1", "T63-G2", "T65-G4-c32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_ssd_scan(T, G, chunk, with_state):
    B, Hs, P, N = 2, 4, 32, 16
    x, dt, A, Bm, Cm = _ssd_inputs(B, T, Hs, P, G, N, T + G)
    state = torch.randn(B, Hs, P, N, generator=gen(2)) if with_state else None
    y, final = ops.ssd_scan(x, dt, A, Bm, Cm, chunk=chunk, state=state)
    y_ref, final_ref = RD.ssd_scan_reference(*d64(x, dt, A, Bm, Cm), state=None if state is None else state.double())
    assert_close(y, y_ref, FP32, "ssd y")
    assert_close(final, final_ref, FP32, "ssd state")


def test_ssd_padded_dims_bf16_and_step():
    """P = 24 and N = 12 are padded to 32 and 16; bf16 inputs; then one step on the final state."""
    B, T, Hs, P, G, N = 1, 40, 2, 24, 1, 12
    x, dt, A, Bm, Cm = _ssd_inputs(B, T, Hs, P, G, N, 13)
    xb, dtb, Bb, Cb = x.bfloat16(), dt.bfloat16(), Bm.bfloat16(), Cm.bfloat16()
    y, final = ops.ssd_scan(xb, dtb, A, Bb, Cb, chunk=16, state=None)
    y_ref, final_ref = RD.ssd_scan_reference(*d64(xb, dtb, A, Bb, Cb), state=None)
    assert_close(y, y_ref, BF16, "bf16 ssd y")
    assert_close(final, final_ref, BF16, "bf16 ssd state")
    state, ref_state = final.clone(), final_ref.clone()
    y1 = ops.ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], state)
    y1_ref = RD.ssd_step(*d64(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0]), ref_state)
    assert_close(y1, y1_ref, FP32, "ssd step y")
    assert_close(state, ref_state, FP32, "ssd step state")


def test_scan_then_steps_equals_longer_scan():
    """prefill(T) == prefill(T - 3) + 3 steps (the end-to-end invariant), on the kernels alone."""
    B, T, Hs, P, G, N = 1, 20, 2, 16, 1, 16
    x, dt, A, Bm, Cm = _ssd_inputs(B, T, Hs, P, G, N, 21)
    y_all, s_all = ops.ssd_scan(x, dt, A, Bm, Cm, chunk=16, state=None)
    y, s = ops.ssd_scan(x[:, :-3], dt[:, :-3], A, Bm[:, :-3], Cm[:, :-3], chunk=16, state=None)
    steps = [ops.ssd_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], s) for t in range(T - 3, T)]
    assert_close(torch.stack(steps, 1), y_all[:, -3:], FP32, "steps vs scan")
    assert_close(s, s_all, FP32, "state after steps")


# ---------------------------------------------------------------------------------------------
# the gated delta rule (Gated DeltaNet: a decay per head; KDA: per key channel)
# ---------------------------------------------------------------------------------------------

DELTA_FP32 = 1e-5
KINDS = pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])


def _delta_inputs(B, T, Hk, Hv, Dk, Dv, per_channel, seed):
    """q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], log-decays g <= 0 ([B,T,Hv] or [B,T,Hv,Dk]) from mild to strong, beta."""
    g = gen(seed)
    q, k = torch.randn(B, T, Hk, Dk, generator=g), torch.randn(B, T, Hk, Dk, generator=g)
    v = torch.randn(B, T, Hv, Dv, generator=g)
    decay = -2 * F.softplus(torch.randn(B, T, Hv, *((Dk,) if per_channel else ()), generator=g) - 1)
    beta = torch.sigmoid(torch.randn(B, T, Hv, generator=g))
    return q, k, v, decay, beta


DELTA = [
    # id: B, T, Hk, Hv, Dk, Dv, chunk, initial state
    pytest.param(1, 1, 1, 1, 16, 16, 16, False, id="T1"),
    pytest.param(2, 37, 1, 2, 16, 16, 16, True, id="T37-not-a-multiple-batch2-gva2-state"),
    pytest.param(1, 32, 2, 2, 16, 16, 16, True, id="T32-two-whole-chunks-state"),
    pytest.param(1, 40, 2, 4, 20, 24, 16, True, id="T40-dk20-dv24-padded-gva2-state"),
    pytest.param(1, 21, 1, 1, 16, 16, 8, False, id="chunk8-tiled-as-16"),
    pytest.param(1, 70, 1, 1, 32, 16, 32, True, id="T70-chunk32-dk32-state"),
]


@KINDS
@pytest.mark.parametrize("B,T,Hk,Hv,Dk,Dv,chunk,with_state", DELTA)
def test_gated_delta_chunked(per_channel, B, T, Hk, Hv, Dk, Dv, chunk, with_state):
    """Outputs and final state against the float64 token loop and against the fp32 reference op."""
    q, k, v, g, beta = _delta_inputs(B, T, Hk, Hv, Dk, Dv, per_channel, T + Hv)
    state = torch.randn(B, Hv, Dk, Dv, generator=gen(5)) if with_state else None
    o, final = ops.gated_delta_chunked(q, k, v, g, beta, chunk=chunk, state=state, l2norm=True, scale=None)
    assert o.dtype == q.dtype and final.dtype == torch.float32
    s64 = None if state is None else state.double()
    o_ref, final_ref = RG.gated_delta_reference(*d64(q, k, v, g, beta), state=s64, l2norm=True, scale=None)
    assert_close(o, o_ref, DELTA_FP32, "delta o vs the token loop")
    assert_close(final, final_ref, DELTA_FP32, "delta final state vs the token loop")
    o_op, final_op = RG.gated_delta_chunked(q, k, v, g, beta, chunk=chunk, state=state, l2norm=True, scale=None)
    assert_close(o, o_op, DELTA_FP32, "delta o vs ops_delta")
    assert_close(final, final_op, DELTA_FP32, "delta final state vs ops_delta")


@KINDS
def test_gated_delta_step(per_channel):
    """One token on a given state (updated in place), GQA 2, padded head dims and a k laid out unlike q,
    against the fp64 step."""
    q, k, v, g, beta = _delta_inputs(2, 1, 2, 4, 20, 24, per_channel, 9)
    k = k.transpose(0, 2).contiguous().transpose(0, 2)  # k strided unlike q: each read with its own layout
    state = torch.randn(2, 4, 20, 24, generator=gen(10))
    ref_state = state.double().clone()
    o = ops.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, l2norm=True, scale=None)
    o_ref = RG.gated_delta_step(*d64(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]), ref_state, l2norm=True,
                                scale=None)
    assert_close(o, o_ref, DELTA_FP32, "delta step o")
    assert_close(state, ref_state, DELTA_FP32, "delta step state")


@KINDS
def test_gated_delta_prefill_then_steps_equals_longer_prefill(per_channel):
    """prefill(T) == prefill(T - 3) + 3 steps, outputs and state, on the kernels alone (T - 3 = 17 crosses a chunk)."""
    q, k, v, g, beta = _delta_inputs(1, 20, 1, 2, 16, 16, per_channel, 11)
    o_all, s_all = ops.gated_delta_chunked(q, k, v, g, beta, chunk=16, state=None, l2norm=True, scale=None)
    o, s = ops.gated_delta_chunked(q[:, :-3], k[:, :-3], v[:, :-3], g[:, :-3], beta[:, :-3], chunk=16, state=None,
                                   l2norm=True, scale=None)
    steps = [ops.gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s, l2norm=True, scale=None)
             for t in range(17, 20)]
    assert_close(o, o_all[:, :17], DELTA_FP32, "prefix outputs")
    assert_close(torch.stack(steps, 1), o_all[:, 17:], DELTA_FP32, "steps vs prefill")
    assert_close(s, s_all, DELTA_FP32, "state after steps")


@KINDS
def test_gated_delta_batch_equals_per_sequence(per_channel):
    q, k, v, g, beta = _delta_inputs(3, 19, 1, 1, 16, 16, per_channel, 12)
    state = torch.randn(3, 1, 16, 16, generator=gen(13))
    o, final = ops.gated_delta_chunked(q, k, v, g, beta, chunk=16, state=state, l2norm=True, scale=None)
    for i in range(3):
        one = slice(i, i + 1)
        o_i, f_i = ops.gated_delta_chunked(q[one], k[one], v[one], g[one], beta[one], chunk=16, state=state[one],
                                           l2norm=True, scale=None)
        assert_close(o[one], o_i, 1e-6, f"sequence {i} output")
        assert_close(final[one], f_i, 1e-6, f"sequence {i} state")


def test_gated_delta_bf16_inputs_and_no_l2norm():
    """bf16 q, k, v (fp32 gates, as the layers give them) and an explicit scale without L2 normalisation."""
    q, k, v, g, beta = _delta_inputs(1, 23, 1, 2, 16, 16, True, 14)
    qb, kb, vb = q.bfloat16(), (k / 4).bfloat16(), v.bfloat16()  # |k| ~ 1: the rule stays contractive unnormalised
    o, final = ops.gated_delta_chunked(qb, kb, vb, g, beta, chunk=16, state=None, l2norm=False, scale=0.3)
    assert o.dtype == torch.bfloat16
    o_ref, final_ref = RG.gated_delta_reference(*d64(qb, kb, vb, g, beta), state=None, l2norm=False, scale=0.3)
    assert_close(o, o_ref, BF16, "bf16 delta o")
    assert_close(final, final_ref, DELTA_FP32, "bf16 delta state (fp32 all along)")
    state, ref_state = final.bfloat16(), final_ref.clone()  # a bf16 cache, as with state_dtype bf16
    o1 = ops.gated_delta_step(qb[:, 0], kb[:, 0], vb[:, 0], g[:, 0], beta[:, 0], state, l2norm=False, scale=0.3)
    o1_ref = RG.gated_delta_step(*d64(qb[:, 0], kb[:, 0], vb[:, 0], g[:, 0], beta[:, 0]), ref_state, l2norm=False,
                                 scale=0.3)
    assert_close(o1, o1_ref, BF16, "bf16 delta step o")
    assert_close(state, ref_state, BF16, "bf16 delta step state")


def test_gated_delta_chunk_not_a_power_of_two_falls_back_with_a_warning():
    """The language refuses such a chunk; a direct call with one runs the reference, says why and is counted."""
    q, k, v, g, beta = _delta_inputs(1, 9, 1, 1, 16, 16, False, 15)
    before = ops.FALLBACKS["gated_delta_chunked:chunk"]
    with pytest.warns(RuntimeWarning, match="chunk 48 is not a power of two"):
        o, _ = ops.gated_delta_chunked(q, k, v, g, beta, chunk=48, state=None, l2norm=True, scale=None)
    assert ops.FALLBACKS["gated_delta_chunked:chunk"] == before + 1
    assert_close(o, RG.gated_delta_reference(*d64(q, k, v, g, beta), state=None, l2norm=True, scale=None)[0],
                 DELTA_FP32, "fallback o")


def test_gated_delta_configuration_failing_the_lint_falls_back_with_a_warning():
    """Chunk 128 with head dims 128 does not fit in H100 shared memory: the reference runs, says why, counted."""
    q, k, v, g, beta = _delta_inputs(1, 3, 1, 1, 128, 128, False, 16)
    before = ops.FALLBACKS["gated_delta_chunked:lint"]
    with pytest.warns(RuntimeWarning, match="fail the lint"):
        o, _ = ops.gated_delta_chunked(q, k, v, g, beta, chunk=128, state=None, l2norm=True, scale=None)
    assert ops.FALLBACKS["gated_delta_chunked:lint"] == before + 1
    assert_close(o, RG.gated_delta_reference(*d64(q, k, v, g, beta), state=None, l2norm=True, scale=None)[0],
                 DELTA_FP32, "fallback o")


def test_gated_delta_fp64_runs_the_reference_and_is_counted():
    q, k, v, g, beta = d64(*_delta_inputs(1, 5, 1, 1, 16, 16, True, 17))
    before = ops.FALLBACKS["gated_delta_chunked:dtype"]
    o, _ = ops.gated_delta_chunked(q, k, v, g, beta, chunk=16, state=None, l2norm=True, scale=None)
    assert ops.FALLBACKS["gated_delta_chunked:dtype"] == before + 1 and o.dtype == torch.float64
    assert_close(o, RG.gated_delta_reference(q, k, v, g, beta, state=None, l2norm=True, scale=None)[0], 1e-12)


@KINDS
def test_gated_delta_backward_recomputes_the_reference(per_channel):
    """Forward on the kernels; gradients of q, k, v, g and beta are the reference op's under autograd."""
    leaves = [t.requires_grad_() for t in _delta_inputs(1, 18, 1, 2, 16, 16, per_channel, 18)]
    o, s = ops.gated_delta_chunked(*leaves, chunk=16, state=None, l2norm=True, scale=None)
    ((o * o).sum() + s.sum()).backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    o_ref, s_ref = RG.gated_delta_chunked(*leaves, chunk=16, state=None, l2norm=True, scale=None)
    assert_close(o.detach(), o_ref.detach(), DELTA_FP32, "forward under autograd")
    ((o_ref * o_ref).sum() + s_ref.sum()).backward()
    for got, t, name in zip(grads, leaves, "q k v g beta".split()):
        assert_close(got, t.grad, DELTA_FP32, f"gradient of {name}")


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
def test_add_rmsnorm(dtype, tol, with_residual):
    g = gen(6)
    x = torch.randn(3, 5, 96, generator=g).to(dtype)
    r = torch.randn(3, 5, 96, generator=g).to(dtype) if with_residual else None
    w = torch.randn(96, generator=g)
    normed, summed = ops.add_rmsnorm(x, r, w, eps=1e-6)
    n_ref, s_ref = RN.add_rmsnorm(*d64(x, r), w.double(), eps=1e-6)
    assert normed.shape == x.shape and summed.dtype == dtype
    assert_close(normed, n_ref, tol, "normed")
    assert_close(summed, s_ref, tol, "summed")


# ---------------------------------------------------------------------------------------------
# fallbacks: explicit and counted
# ---------------------------------------------------------------------------------------------

def test_fp64_falls_back_to_reference_and_is_counted():
    before = ops.FALLBACKS["add_rmsnorm:dtype"]
    x = torch.randn(4, 32, dtype=torch.float64)
    normed, _ = ops.add_rmsnorm(x, None, torch.ones(32, dtype=torch.float64), eps=1e-5)
    assert ops.FALLBACKS["add_rmsnorm:dtype"] == before + 1
    assert_close(normed, RN.add_rmsnorm(x, None, torch.ones(32, dtype=torch.float64), eps=1e-5)[0], 1e-12)


def test_backward_uses_reference_autograd():
    g = gen(8)
    q = torch.randn(1, 9, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 9, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 9, 2, 16, generator=g, requires_grad=True)
    out = ops.attention(q, k, v, causal=True, window=None, scale=0.25)
    (out * out).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = RA.attention_reference(q, k, v, causal=True, window=None, scale=0.25)
    assert_close(out.detach(), ref.detach(), FP32, "forward under autograd")
    (ref * ref).sum().backward()
    for got, t in zip(grads, (q, k, v)):
        assert_close(got, t.grad, FP32, "gradient")


def test_configuration_failing_the_lint_falls_back_explicitly():
    """fp32 SSD with P 128 x N 256 does not fit in H100 shared memory: the reference runs, counted."""
    before = ops.FALLBACKS["ssd_scan:lint"]
    x, dt, A, Bm, Cm = _ssd_inputs(1, 3, 1, 128, 1, 256, 30)
    y, final = ops.ssd_scan(x, dt, A, Bm, Cm, chunk=256, state=None)
    assert ops.FALLBACKS["ssd_scan:lint"] == before + 1
    y_ref, _ = RD.ssd_scan_reference(*d64(x, dt, A, Bm, Cm), state=None)
    assert_close(y, y_ref, FP32, "fallback ssd")
