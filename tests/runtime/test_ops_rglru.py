"""RG-LRU (runtime/ops_rglru.py): chunked scan vs token loop, steps, resets, and transformers' RecurrentGemma.

Tolerances: fp64 op vs op 1e-10 (same math, different association); fp32 vs the fp64 oracle 1e-4;
against transformers' RecurrentGemmaRglru in fp64 1e-6 (relative max-abs error).
Inputs are seeded random, lengths odd (1, 63, 65, 127); sigma(Lambda) drawn in [0.9, 0.999] as Griffin
initialises it, so a_t = sigma(Lambda)^(8 r_t) stays well conditioned.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_close, rel_err

from ltmdsl.runtime import ops_rglru as rg

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def a_param_for(base: torch.Tensor) -> torch.Tensor:
    """The checkpoint parameter whose sigma(Lambda) is `base`: softplus(a_param) = -log(base)."""
    return torch.log(torch.expm1(-torch.log(base)))


def inputs(Bsz, T, W, g):
    x = randn(Bsz, T, W, g=g)
    gate_x, gate_a = torch.sigmoid(randn(Bsz, T, W, g=g)), torch.sigmoid(randn(Bsz, T, W, g=g))
    base = 0.9 + 0.099 * torch.rand(W, generator=g, dtype=F64)  # [W]   sigma(Lambda) in [0.9, 0.999]
    return x, gate_x, gate_a, a_param_for(base)


def start_reset(Bsz, T):
    """transformers' reset for a prefill from position 0: position_ids == 0 at t = 0 only."""
    reset = torch.zeros(Bsz, T, dtype=torch.bool)
    reset[:, 0] = True
    return reset


@pytest.mark.parametrize("T", [1, 63, 65, 127])
@pytest.mark.parametrize("chunk", [16, 5], ids=["chunk16", "chunk5"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "given-state"])
def test_scan_matches_token_loop(T, chunk, init):
    g = gen(T + chunk)
    x, gx, ga, ap = inputs(2, T, 6, g)
    h0 = randn(2, 6, g=g) if init else None
    y, h = rg.rglru_scan(x, gx, ga, ap, reset=None, state=h0, chunk=chunk)
    y_ref, h_ref = rg.rglru_scan_reference(x, gx, ga, ap, reset=None, state=h0)
    assert y.shape == (2, T, 6) and h.shape == (2, 6)
    assert_close(y, y_ref, 1e-10, "outputs")
    assert_close(h, h_ref, 1e-10, "final state")


@pytest.mark.parametrize("where", [(0,), (0, 30), (17, 64)], ids=["start", "start+mid", "mid-only"])
def test_resets_match_token_loop(where):
    """Resets (packed documents) inside and across chunks; a reset drops a given state."""
    g = gen(1)
    x, gx, ga, ap = inputs(2, 65, 6, g)
    reset = torch.zeros(2, 65, dtype=torch.bool)
    reset[0, list(where)] = True
    reset[1, 40] = True
    h0 = randn(2, 6, g=g)
    y, h = rg.rglru_scan(x, gx, ga, ap, reset=reset, state=h0, chunk=16)
    y_ref, h_ref = rg.rglru_scan_reference(x, gx, ga, ap, reset=reset, state=h0)
    assert_close(y, y_ref, 1e-10, "outputs")
    assert_close(h, h_ref, 1e-10, "final state")


@pytest.mark.parametrize("T,k", [(65, 1), (63, 4), (1, 1)], ids=["65-1", "63-4", "1-1"])
def test_prefill_then_steps_equals_prefill(T, k):
    g = gen(2)
    x, gx, ga, ap = inputs(2, T, 6, g)
    reset = start_reset(2, T)
    y_full, h_full = rg.rglru_scan(x, gx, ga, ap, reset=reset, state=None, chunk=16)
    y_head, state = rg.rglru_scan(
        x[:, : T - k], gx[:, : T - k], ga[:, : T - k], ap, reset=reset[:, : T - k], state=None, chunk=16
    )
    steps = [rg.rglru_step(x[:, t], gx[:, t], ga[:, t], ap, state, reset=reset[:, t]) for t in range(T - k, T)]
    assert_close(torch.cat([y_head, torch.stack(steps, dim=1)], dim=1), y_full, 1e-10, "outputs")
    assert_close(state, h_full, 1e-10, "state after steps")


def test_chunk_sizes_agree():
    g = gen(3)
    x, gx, ga, ap = inputs(2, 127, 6, g)
    reset = start_reset(2, 127)
    y1, h1 = rg.rglru_scan(x, gx, ga, ap, reset=reset, state=None, chunk=1)
    for chunk in (7, 32, 64, 200):
        y, h = rg.rglru_scan(x, gx, ga, ap, reset=reset, state=None, chunk=chunk)
        assert_close(y, y1, 1e-10, f"outputs, chunk {chunk}")
        assert_close(h, h1, 1e-10, f"state, chunk {chunk}")


def test_batch_equals_per_sequence():
    g = gen(4)
    x, gx, ga, ap = inputs(3, 65, 6, g)
    h0 = randn(3, 6, g=g)
    y, h = rg.rglru_scan(x, gx, ga, ap, reset=None, state=h0, chunk=16)
    for b in range(3):
        sl = slice(b, b + 1)
        yb, hb = rg.rglru_scan(x[sl], gx[sl], ga[sl], ap, reset=None, state=h0[sl], chunk=16)
        assert_close(y[sl], yb, 1e-12, f"outputs of sequence {b}")
        assert_close(h[sl], hb, 1e-12, f"state of sequence {b}")


def test_fp32_vs_fp64_oracle():
    g = gen(5)
    x, gx, ga, ap = inputs(2, 127, 16, g)
    reset = start_reset(2, 127)
    y, h = rg.rglru_scan(x.float(), gx.float(), ga.float(), ap.float(), reset=reset, state=None, chunk=32)
    y_ref, h_ref = rg.rglru_scan_reference(x, gx, ga, ap, reset=reset, state=None)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, 1e-4, "fp32 outputs")
    assert_close(h, h_ref, 1e-4, "fp32 state")


def _grads(fn, args):
    """Gradients of sum(w * fn(args)) for a fixed seeded weight w: one per floating input."""
    leaves = [a.clone().requires_grad_() for a in args]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=gen(99), dtype=out.dtype)
    (out * w).sum().backward()
    return [a.grad for a in leaves]


def test_gradients_match_token_loop():
    """Training differentiates the chunked scan under autograd: its gradients equal the token loop's."""
    x, gx, ga, ap = inputs(2, 21, 6, gen(12))
    reset = start_reset(2, 21)
    ours = _grads(lambda *a: rg.rglru_scan(*a, reset=reset, state=None, chunk=8)[0], [x, gx, ga, ap])
    ref = _grads(lambda *a: rg.rglru_scan_reference(*a, reset=reset, state=None)[0], [x, gx, ga, ap])
    for name, a, e in zip(("x", "gate_x", "gate_a", "a_param"), ours, ref):
        assert_close(a, e, 1e-10, f"d/d{name}")


def test_gates_known_answer():
    """One input at t = 3 (no reset): h_3 = sqrt(1 - a_3^2) i_3 x_3, then h_t = a_t h_{t-1} with
    a_t = sigma(Lambda)^(8 r_t). Dropping the recurrence gate, the input gate or the sqrt(1 - a^2)
    normalisation changes every later output, so each fails here."""
    g = gen(6)
    x, gx, ga, ap = inputs(1, 30, 6, g)
    x[:, :3], x[:, 4:] = 0, 0
    y, _ = rg.rglru_scan(x, gx, ga, ap, reset=None, state=None, chunk=8)
    a = torch.sigmoid(-ap) ** (8 * ga)  # [1, T, W]
    h3 = torch.sqrt(1 - a[:, 3] ** 2) * gx[:, 3] * x[:, 3]  # [1, W]
    expected = torch.zeros_like(y)
    expected[:, 3:] = h3[:, None] * torch.cumprod(torch.cat([torch.ones_like(a[:, 3:4]), a[:, 4:]], dim=1), dim=1)
    assert_close(y, expected, 1e-12, "single input decayed by the gated a_t")
    ungated, _ = rg.rglru_scan(x, torch.ones_like(gx), torch.ones_like(ga), ap, reset=None, state=None, chunk=8)
    assert rel_err(ungated, y) > 0.1


def test_reset_drops_state_and_normalisation():
    """At a reset h_t = i_t x_t exactly: the carried state and the sqrt(1 - a^2) factor are both gone."""
    g = gen(7)
    x, gx, ga, ap = inputs(2, 5, 6, g)
    reset = torch.zeros(2, 5, dtype=torch.bool)
    reset[:, 2] = True
    y, _ = rg.rglru_scan(x, gx, ga, ap, reset=reset, state=randn(2, 6, g=g), chunk=4)
    assert_close(y[:, 2], gx[:, 2] * x[:, 2], 1e-15, "output at the reset")


def test_rejects_bad_chunk():
    x, gx, ga, ap = inputs(1, 3, 2, gen(8))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        rg.rglru_scan(x, gx, ga, ap, reset=None, state=None, chunk=0)


# ---- against transformers' RecurrentGemmaRglru ---------------------------------------------------


def _rglru_module(W=12, heads=3):
    """transformers' RG-LRU module, float64, with random gates and Griffin's a initialisation; its scan's
    accumulation dtype (fp32 by default even for fp64 inputs) raised to fp64 so 1e-6 compares the math."""
    hf = pytest.importorskip("transformers.models.recurrent_gemma.modeling_recurrent_gemma")
    cfg = hf.RecurrentGemmaConfig(hidden_size=W, lru_width=W, num_attention_heads=heads, num_hidden_layers=3,
                               vocab_size=32, intermediate_size=24)
    mod = hf.RecurrentGemmaRglru(cfg).double()
    g = gen(9)
    bw = W // heads
    with torch.no_grad():
        mod.recurrent_param.copy_(a_param_for(0.9 + 0.099 * torch.rand(W, generator=g, dtype=F64)))
        for w in (mod.input_gate_weight, mod.recurrent_gate_weight):
            w.copy_(randn(heads, bw, bw, g=g) / bw**0.5)
        for b in (mod.input_gate_bias, mod.recurrent_gate_bias):
            b.copy_(randn(heads, bw, g=g))
    mod._rnn_scan = functools.partial(type(mod)._rnn_scan, mod, acc_dtype=F64)
    return mod


def _gates(mod, x):
    """The layer's gates: sigmoid of the block-diagonal projections of x [B,T,W] (Griffin's W_x, W_a)."""
    Bsz, T, W = x.shape
    xh = x.reshape(Bsz, T, mod.num_attention_heads, mod.block_width)  # [B, T, heads, W/heads]

    def gate(weight, bias):
        return torch.sigmoid(torch.einsum("bthi,hij->bthj", xh, weight) + bias).reshape(Bsz, T, W)

    return gate(mod.input_gate_weight, mod.input_gate_bias), gate(mod.recurrent_gate_weight, mod.recurrent_gate_bias)


@pytest.mark.parametrize("T", [1, 37], ids=["T1", "T37"])
def test_matches_transformers_prefill(T):
    mod = _rglru_module()
    x = randn(2, T, 12, g=gen(10))
    pos = torch.arange(T)[None].expand(2, T)
    with torch.no_grad():
        mod.recurrent_states = None
        ref = mod(x, pos)
        gx, ga = _gates(mod, x)
        y, h = rg.rglru_scan(x, gx, ga, mod.recurrent_param, reset=pos == 0, state=None, chunk=16)
    assert_close(y, ref, 1e-6, "outputs")
    assert_close(h, mod.recurrent_states, 1e-6, "final state")


def test_matches_transformers_prefill_then_decode():
    """A prefill of 20 tokens (resetting at position 0), then 4 decode steps from the module's carried state."""
    mod = _rglru_module()
    x = randn(2, 24, 12, g=gen(11))
    with torch.no_grad():
        mod.recurrent_states = None
        refs = [mod(x[:, :20], torch.arange(20)[None].expand(2, 20))]
        refs += [mod(x[:, t : t + 1], torch.full((2, 1), t)) for t in range(20, 24)]
        gx, ga = _gates(mod, x)
        reset = start_reset(2, 24)
        y, state = rg.rglru_scan(x[:, :20], gx[:, :20], ga[:, :20], mod.recurrent_param, reset=reset[:, :20],
                                 state=None, chunk=8)
        steps = [rg.rglru_step(x[:, t], gx[:, t], ga[:, t], mod.recurrent_param, state) for t in range(20, 24)]
    assert_close(torch.cat([y, torch.stack(steps, dim=1)], dim=1), torch.cat(refs, dim=1), 1e-6, "outputs")
    assert_close(state, mod.recurrent_states, 1e-6, "state after decode")
