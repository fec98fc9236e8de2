"""mLSTM (runtime/ops_mlstm.py): chunked form vs token loop, steps, the stabiliser, and transformers' xLSTM.

Tolerances: fp64 op vs op 1e-10 (same math, different association); fp32 vs the fp64 oracle 1e-4;
against transformers' native xLSTM kernels and its xLSTMLayer in fp64 1e-6 (relative max-abs error).
Inputs are seeded random, lengths odd (1, 63, 65, 127); gates as xLSTM-7B makes them: pre-activations
soft-capped at 15, the forget gate sigmoid (log f = logsigmoid, biased towards remembering).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, rel_err

from ltmdsl.runtime import ops_mlstm as ml

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def soft_cap(x, cap=15.0):
    return cap * torch.tanh(x / cap)


def inputs(Bsz, T, H, D, Dv, g, forget="sigmoid"):
    q, k, v = randn(Bsz, T, H, D, g=g), randn(Bsz, T, H, D, g=g), randn(Bsz, T, H, Dv, g=g)
    i_gate = soft_cap(3 * randn(Bsz, T, H, g=g))  # [B, T, H]   log of the exponential input gate
    f_pre = soft_cap(randn(Bsz, T, H, g=g) + 3)
    log_f = F.logsigmoid(f_pre) if forget == "sigmoid" else 0.3 * randn(Bsz, T, H, g=g)  # exp gate: any sign
    return q, k, v, i_gate, log_f


def random_state(Bsz, H, D, Dv, g):
    return ml.MlstmState(randn(Bsz, H, D, Dv, g=g), randn(Bsz, H, D, g=g), randn(Bsz, H, g=g))


def assert_state_close(actual, expected, rtol, what):
    for name, a, e in zip(("C", "n", "m"), actual, expected):
        assert_close(a, e.reshape(a.shape), rtol, f"{what} {name}")


@pytest.mark.parametrize("T", [1, 63, 65, 127])
@pytest.mark.parametrize("chunk", [16, 5], ids=["chunk16", "chunk5"])
@pytest.mark.parametrize("init", [False, True], ids=["empty-state", "given-state"])
@pytest.mark.parametrize("forget", ["sigmoid", "exp"])
def test_chunked_matches_token_loop(T, chunk, init, forget):
    g = gen(T + chunk)
    q, k, v, ig, lf = inputs(2, T, 3, 4, 5, g, forget)
    s0 = random_state(2, 3, 4, 5, g) if init else None
    h, s = ml.mlstm_chunked(q, k, v, ig, lf, chunk=chunk, state=s0)
    h_ref, s_ref = ml.mlstm_reference(q, k, v, ig, lf, state=s0)
    assert h.shape == (2, T, 3, 5)
    assert_close(h, h_ref, 1e-10, "outputs")
    assert_state_close(s, s_ref, 1e-10, "final state")


@pytest.mark.parametrize("T,k", [(65, 1), (63, 4), (1, 1)], ids=["65-1", "63-4", "1-1"])
def test_prefill_then_steps_equals_prefill(T, k):
    g = gen(2)
    q, kk, v, ig, lf = inputs(2, T, 3, 4, 5, g)
    h_full, s_full = ml.mlstm_chunked(q, kk, v, ig, lf, chunk=16, state=None)
    h_head, state = ml.mlstm_chunked(q[:, : T - k], kk[:, : T - k], v[:, : T - k], ig[:, : T - k], lf[:, : T - k],
                                     chunk=16, state=None)
    steps = [ml.mlstm_step(q[:, t], kk[:, t], v[:, t], ig[:, t], lf[:, t], state) for t in range(T - k, T)]
    assert_close(torch.cat([h_head, torch.stack(steps, dim=1)], dim=1), h_full, 1e-10, "outputs")
    assert_state_close(state, s_full, 1e-10, "state after steps")


def test_chunk_sizes_agree():
    g = gen(3)
    q, k, v, ig, lf = inputs(2, 127, 3, 4, 5, g)
    h1, s1 = ml.mlstm_chunked(q, k, v, ig, lf, chunk=1, state=None)
    for chunk in (7, 32, 64, 200):
        h, s = ml.mlstm_chunked(q, k, v, ig, lf, chunk=chunk, state=None)
        assert_close(h, h1, 1e-10, f"outputs, chunk {chunk}")
        assert_state_close(s, s1, 1e-10, f"state, chunk {chunk}")


def test_batch_equals_per_sequence():
    g = gen(4)
    q, k, v, ig, lf = inputs(3, 65, 3, 4, 5, g)
    s0 = random_state(3, 3, 4, 5, g)
    h, s = ml.mlstm_chunked(q, k, v, ig, lf, chunk=16, state=s0)
    for b in range(3):
        sl = slice(b, b + 1)
        hb, sb = ml.mlstm_chunked(q[sl], k[sl], v[sl], ig[sl], lf[sl], chunk=16,
                                  state=ml.MlstmState(*(t[sl] for t in s0)))
        assert_close(h[sl], hb, 1e-12, f"outputs of sequence {b}")
        assert_state_close(ml.MlstmState(*(t[sl] for t in s)), sb, 1e-12, f"state of sequence {b}")


def test_fp32_vs_fp64_oracle():
    """fp32 with input gates up to the soft cap (exp(15) unstabilised): the stabiliser keeps it at 1e-4."""
    g = gen(5)
    q, k, v, ig, lf = inputs(2, 127, 3, 8, 8, g)
    h, s = ml.mlstm_chunked(q.float(), k.float(), v.float(), ig.float(), lf.float(), chunk=32, state=None)
    h_ref, s_ref = ml.mlstm_reference(q, k, v, ig, lf, state=None)
    assert h.dtype == torch.float32
    assert_close(h, h_ref, 1e-4, "fp32 outputs")
    assert_state_close(s, s_ref, 1e-4, "fp32 state")


def _grads(fn, args):
    """Gradients of sum(w * fn(args)) for a fixed seeded weight w: one per floating input."""
    leaves = [a.clone().requires_grad_() for a in args]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=gen(99), dtype=out.dtype)
    (out * w).sum().backward()
    return [a.grad for a in leaves]


def test_gradients_match_token_loop():
    """Training differentiates the chunked form under autograd (padding included: 21 = 2 x 8 + 5):
    its gradients are finite and equal the token loop's."""
    args = list(inputs(2, 21, 3, 4, 5, gen(14)))
    ours = _grads(lambda *a: ml.mlstm_chunked(*a, chunk=8, state=None)[0], args)
    ref = _grads(lambda *a: ml.mlstm_reference(*a, state=None)[0], args)
    for name, a, e in zip(("q", "k", "v", "i_gate", "log_f"), ours, ref):
        assert_close(a, e, 1e-10, f"d/d{name}")


def test_gates_known_answer():
    """One write at t = 0 (k = 0 after it), eps = 0: in true scale C_t = F_t e^{i_0} k_0 v_0^T with
    F_t = prod_{s=1..t} f_s, so h_t = F_t e^{i_0} (q~_t.k_0) v_0 / max(F_t e^{i_0} |q~_t.k_0|, 1).
    Dropping the forget gate, the input gate or the normaliser changes this, so each fails here."""
    g = gen(6)
    q, k, v, ig, lf = inputs(1, 30, 3, 4, 5, g)
    k[:, 1:] = 0
    h, _ = ml.mlstm_chunked(q, k, v, ig, lf, chunk=8, state=None, eps=0.0)
    decay = torch.exp(torch.cumsum(lf, dim=1) - lf[:, :1])  # [1, T, H]   F_t (F_0 = 1)
    w = decay * torch.exp(ig[:, :1]) * torch.einsum("bthd,bhd->bth", q * 0.5, k[:, 0])  # [1, T, H]
    expected = w[..., None] * v[:, :1] / torch.clamp(w.abs(), min=1.0)[..., None]
    assert_close(h, expected, 1e-12, "single write through the gates")
    no_forget, _ = ml.mlstm_chunked(q, k, v, ig, torch.zeros_like(lf), chunk=8, state=None, eps=0.0)
    assert rel_err(no_forget, h) > 0.1


def test_stabiliser_state_is_the_running_max():
    """m_t = max(log f_t + m_{t-1}, i_gate_t) from m_0 = 0, whatever the chunking."""
    g = gen(7)
    q, k, v, ig, lf = inputs(2, 40, 3, 4, 5, g)
    _, s = ml.mlstm_chunked(q, k, v, ig, lf, chunk=16, state=None)
    m = torch.zeros(2, 3, dtype=F64)
    for t in range(40):
        m = torch.maximum(lf[:, t] + m, ig[:, t])
    assert_close(s.m, m, 1e-12, "m")


def test_rejects_bad_chunk():
    q, k, v, ig, lf = inputs(1, 3, 1, 2, 2, gen(8))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        ml.mlstm_chunked(q, k, v, ig, lf, chunk=0, state=None)


# ---- against transformers' xLSTM (its native torch backends, and the layer of xLSTM-7B) -----------


def _xlstm():
    """transformers' xLSTM modelling module with its native torch kernels (they are defined only when the
    external `xlstm` package is absent; skips where they are not there)."""
    hf = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")
    if not hasattr(hf, "mlstm_chunkwise_native_autograd"):
        pytest.skip("transformers uses the external xlstm package's kernels here")
    return hf


def _heads_first(*ts):
    """[B, T, H, ...] -> transformers' [B, H, T, ...]."""
    return tuple(t.transpose(1, 2).contiguous() for t in ts)


def _their_state(s):
    return s.C, s.n, s.m[..., None]


@pytest.mark.parametrize("init", [False, True], ids=["empty-state", "given-state"])
def test_matches_transformers_recurrent_sequence(init):
    mlstm_recurrent_sequence_native = _xlstm().mlstm_recurrent_sequence_native

    g = gen(9)
    q, k, v, ig, lf = inputs(2, 37, 3, 4, 5, g)
    f_pre = torch.log(torch.expm1(-lf)).neg()  # the pre-activation whose logsigmoid is lf
    s0 = random_state(2, 3, 4, 5, g) if init else None
    init_kw = dict(zip(("c_initial", "n_initial", "m_initial"), _their_state(s0))) if init else {}
    ref_h, ref_s = mlstm_recurrent_sequence_native(
        *_heads_first(q, k, v), *_heads_first(ig, f_pre), **init_kw, return_last_states=True, eps=1e-6,
        dtype_state=F64,
    )
    h, s = ml.mlstm_chunked(q, k, v, ig, lf, chunk=16, state=s0)
    assert_close(h, ref_h.transpose(1, 2), 1e-6, "outputs")
    assert_state_close(s, ref_s, 1e-6, "final state")


@pytest.mark.parametrize("init", [False, True], ids=["empty-state", "given-state"])
def test_matches_transformers_chunkwise(init):
    mlstm_chunkwise_native_autograd = _xlstm().mlstm_chunkwise_native_autograd

    g = gen(10)
    q, k, v, ig, lf = inputs(2, 48, 3, 4, 5, g)
    f_pre = torch.log(torch.expm1(-lf)).neg()
    s0 = random_state(2, 3, 4, 5, g) if init else None
    init_kw = dict(zip(("c_initial", "n_initial", "m_initial"), _their_state(s0))) if init else {}
    ref_h, ref_s = mlstm_chunkwise_native_autograd(
        *_heads_first(q, k, v), *_heads_first(ig, f_pre), **init_kw, return_last_states=True, eps=1e-6,
        chunk_size=16,
    )
    h, s = ml.mlstm_chunked(q, k, v, ig, lf, chunk=7, state=s0)
    assert_close(h, ref_h.transpose(1, 2), 1e-6, "outputs")
    assert_state_close(s, ref_s, 1e-6, "final state")


def test_matches_transformers_step():
    mlstm_recurrent_step_native = _xlstm().mlstm_recurrent_step_native

    g = gen(11)
    q, k, v, ig, lf = inputs(2, 1, 3, 4, 5, g)
    f_pre = torch.log(torch.expm1(-lf)).neg()
    s0 = random_state(2, 3, 4, 5, g)
    ref_h, ref_s = mlstm_recurrent_step_native(
        q[:, 0], k[:, 0], v[:, 0], ig[:, 0, :, None], f_pre[:, 0, :, None], *_their_state(s0), eps=1e-6,
        dtype_state=F64,
    )
    state = ml.MlstmState(*(t.clone() for t in s0))
    h = ml.mlstm_step(q[:, 0], k[:, 0], v[:, 0], ig[:, 0], lf[:, 0], state)
    assert_close(h, ref_h, 1e-6, "output")
    assert_state_close(state, ref_s, 1e-6, "state")


def _xlstm_layer():
    """transformers' xLSTMLayer of a tiny xLSTM-7B-shaped config (qk = d/2, v = d, soft cap 15), fp64, in
    its chunkwise training mode with chunk 16; its norm weight and gate biases randomised."""
    hf = _xlstm()
    cfg = hf.xLSTMConfig(hidden_size=16, num_heads=2, num_hidden_layers=1, vocab_size=32, mode="train",
                      chunk_size=16, return_last_states=True)
    torch.manual_seed(0)
    layer = hf.xLSTMLayer(cfg).double()
    with torch.no_grad():
        layer.multihead_norm.weight.normal_(1.0, 0.2)
        layer.fgate_preact.bias.normal_(3.0, 1.0)
        layer.igate_preact.bias.normal_(0.0, 1.0)
    return layer


def test_matches_transformers_xlstm_layer():
    """The layer of xLSTM-7B around our op (gates soft-capped at 15, log f = logsigmoid), with the
    module's own projections, norm and output gate, equals transformers' xLSTMLayer."""
    layer = _xlstm_layer()
    cfg = layer.config
    x = randn(2, 32, 16, g=gen(12))
    with torch.no_grad():
        ref, ref_state = layer(x)
        Bsz, T, _ = x.shape
        q = layer.q(x).reshape(Bsz, T, cfg.num_heads, -1)  # [B, T, H, D]
        k = layer.k(x).reshape(Bsz, T, cfg.num_heads, -1)
        v = layer.v(x).reshape(Bsz, T, cfg.num_heads, -1)  # [B, T, H, Dv]
        ig = soft_cap(layer.igate_preact(x), cfg.gate_soft_cap)  # [B, T, H]
        lf = F.logsigmoid(soft_cap(layer.fgate_preact(x), cfg.gate_soft_cap))
        h, state = ml.mlstm_chunked(q, k, v, ig, lf, chunk=8, state=None, eps=cfg.eps)
        out = layer.out_proj(torch.sigmoid(layer.ogate_preact(x)) * layer.multihead_norm(h))
    assert_close(out, ref, 1e-6, "layer output")
    assert_state_close(state, ref_state, 1e-6, "final state")

