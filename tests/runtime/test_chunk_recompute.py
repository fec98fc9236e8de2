"""Chunk-recomputed scans (runtime/chunk_recompute.py) behind the four chunked recurrences: their backward
equals autograd through the float64 token-loop oracle, and autograd keeps only their inputs and chunk start
states.

Tolerance: fp64 (1e-12 for a plain cumulative sum); fp64 gradients of the chunked op vs the token-loop oracle 1e-10 relative max-abs error (same math,
different association). Every input, the incoming state and the returned final state carry gradients (the
context-parallel path differentiates through both), lengths are odd so the last chunk is short.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from ltmdsl.runtime import ops_mlstm, ops_rglru, ops_scan, ops_ssd
from ltmdsl.runtime.chunk_recompute import run_chunks

F64 = torch.float64


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def mamba_case(g):
    """Mamba-1: (inputs, state, chunked op, oracle); B=2, T=11, Di=3, N=4, chunk 4."""
    u, Bm, Cm = randn(2, 11, 3, g=g), randn(2, 11, 4, g=g), randn(2, 11, 4, g=g)
    delta, A = F.softplus(randn(2, 11, 3, g=g) - 1), -torch.exp(0.5 * randn(3, 4, g=g))
    return ((u, delta, A, Bm, Cm), (randn(2, 3, 4, g=g),),
            lambda *a, state: ops_scan.selective_scan(*a, state=state[0], chunk=4),
            lambda *a, state: ops_scan.selective_scan_reference(*a, state=state[0]))


def mamba2_case(g):
    """Mamba-2: B=2, T=11, Hs=4, P=3, G=2, N=5, chunk 4."""
    x, Bm, Cm = randn(2, 11, 4, 3, g=g), randn(2, 11, 2, 5, g=g), randn(2, 11, 2, 5, g=g)
    dt, A = F.softplus(randn(2, 11, 4, g=g) - 1), -torch.exp(randn(4, g=g))
    return ((x, dt, A, Bm, Cm), (randn(2, 4, 3, 5, g=g),),
            lambda *a, state: ops_ssd.ssd_scan(*a, chunk=4, state=state[0]),
            lambda *a, state: ops_ssd.ssd_scan_reference(*a, state=state[0]))


def mlstm_case(g):
    """mLSTM: B=2, T=11, H=3, D=4, Dv=5, chunk 4; soft-capped gates, sigmoid forget gate."""
    q, k, v = randn(2, 11, 3, 4, g=g), randn(2, 11, 3, 4, g=g), randn(2, 11, 3, 5, g=g)
    i_gate, log_f = 15 * torch.tanh(randn(2, 11, 3, g=g) / 5), F.logsigmoid(randn(2, 11, 3, g=g) + 3)
    state = (randn(2, 3, 4, 5, g=g), randn(2, 3, 4, g=g), randn(2, 3, g=g))
    return ((q, k, v, i_gate, log_f), state,
            lambda *a, state: ops_mlstm.mlstm_chunked(*a, chunk=4, state=ops_mlstm.MlstmState(*state)),
            lambda *a, state: ops_mlstm.mlstm_reference(*a, state=ops_mlstm.MlstmState(*state)))


def rglru_case(g):
    """RG-LRU: B=2, T=11, W=3, chunk 4, a reset at position 5 of the first sequence."""
    x, gx, ga = randn(2, 11, 3, g=g), torch.sigmoid(randn(2, 11, 3, g=g)), torch.sigmoid(randn(2, 11, 3, g=g))
    a_param = torch.log(torch.expm1(-torch.log(0.9 + 0.09 * torch.rand(3, generator=g, dtype=F64))))
    reset = torch.zeros(2, 11, dtype=torch.bool)
    reset[0, 5] = True
    return ((x, gx, ga, a_param), (randn(2, 3, g=g),),
            lambda *a, state: ops_rglru.rglru_scan(*a, reset=reset, state=state[0], chunk=4),
            lambda *a, state: ops_rglru.rglru_scan_reference(*a, reset=reset, state=state[0]))


CASES = {"mamba": mamba_case, "mamba2": mamba2_case, "mlstm": mlstm_case, "rg_lru": rglru_case}


def _grads(op, inputs, state):
    """Gradients of a random projection of (y, final state) w.r.t. every input and the incoming state."""
    leaves = [t.clone().requires_grad_(True) for t in (*inputs, *state)]
    y, final = op(*leaves[:len(inputs)], state=tuple(leaves[len(inputs):]))
    final = tuple(final) if isinstance(final, tuple) else (final,)
    gen = torch.Generator().manual_seed(99)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=F64)).sum() for t in (y, *final))
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("kind", list(CASES))
def test_backward_matches_token_loop_oracle(kind):
    """d(y, final state)/d(inputs, incoming state) of the chunk-recomputed op = autograd through the oracle."""
    inputs, state, op, oracle = CASES[kind](torch.Generator().manual_seed(3))
    ours = _grads(op, inputs, state)
    ref = _grads(oracle, inputs, state)
    for i, (a, e) in enumerate(zip(ours, ref)):
        assert_close(a, e, 1e-10, f"{kind} gradient {i}")


def _saved(fn) -> int:
    """Bytes of the distinct storages autograd keeps while fn() runs (saved-tensor hooks)."""
    kept = {}

    def pack(t):
        kept[id(t.untyped_storage())] = t.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in kept.values())


@pytest.mark.parametrize("chunk", [4, 8, 16])
def test_keeps_only_inputs_and_chunk_start_states(chunk):
    """Mamba-1 at T=32, Di=6, N=5 in fp32: autograd keeps u, delta, Bm, Cm, A and one [B,Di,N] start state
    per chunk, the incoming zeros included, nothing that grows with chunk * Di * N."""
    g = torch.Generator().manual_seed(5)
    B, T, Di, N = 2, 32, 6, 5
    u, Bm, Cm = (randn(*s, g=g).float().requires_grad_() for s in ((B, T, Di), (B, T, N), (B, T, N)))
    delta = F.softplus(randn(B, T, Di, g=g)).float().requires_grad_()
    A = -torch.rand(Di, N, generator=g).requires_grad_()
    kept = _saved(lambda: ops_scan.selective_scan(u, delta, A, Bm, Cm, state=None, chunk=chunk))
    inputs = 4 * (2 * B * T * Di + 2 * B * T * N + Di * N)
    assert kept == inputs + 4 * B * Di * N * (T // chunk)


def test_no_autograd_saves_nothing_and_matches():
    """Without gradients the same chunks run and nothing is kept; y equals the autograd path's bitwise."""
    calls = []

    def step(seq, shared, state):
        (x,), (h,) = seq, state
        calls.append(x.shape[1])
        hs = torch.cumsum(x, dim=1) + h[:, None]  # [B, L, W]
        return hs, (hs[:, -1],)

    x = torch.randn(2, 10, 3, dtype=F64, requires_grad=True)
    h0 = torch.zeros(2, 3, dtype=F64)
    with torch.no_grad():
        y0, _ = run_chunks(step, (x,), (), (h0,), chunk=4, out_dtype=F64)
    assert calls == [4, 4, 2]
    assert _saved(lambda: run_chunks(step, (x.detach(),), (), (h0,), chunk=4, out_dtype=F64)) == 0
    y1, _ = run_chunks(step, (x,), (), (h0,), chunk=4, out_dtype=F64)
    assert torch.equal(y0, y1.detach())
    assert_close(y0, torch.cumsum(x.detach(), dim=1), 1e-12, "chunked cumulative sum")
    (y1 * torch.arange(10, dtype=F64)[None, :, None]).sum().backward()
    expected = torch.arange(10, dtype=F64).flip(0).cumsum(0).flip(0)  # d/dx_t of sum_s s * y_s = sum_{s>=t} s
    assert_close(x.grad, expected[None, :, None].expand(2, 10, 3), 1e-12, "gradient through the chunk boundaries")


def test_recompute_region_keeps_only_its_inputs_and_matches_autograd():
    """A Mamba-style fp32 gate (y + D x) * silu(z) under `recompute`: autograd keeps y, x, z and D (nothing of
    the fp32 temporaries) and the gradients equal plain autograd's bitwise (the same operations, run again)."""
    from ltmdsl.runtime.chunk_recompute import recompute

    def gate(y, x, z, D):
        return ((y.float() + x.float() * D) * F.silu(z.float())).to(y.dtype)

    g = torch.Generator().manual_seed(7)
    leaves = [randn(2, 5, 8, g=g) for _ in range(3)] + [randn(8, g=g)]
    plain = [t.clone().requires_grad_() for t in leaves]
    ours = [t.clone().requires_grad_() for t in leaves]
    w = randn(2, 5, 8, g=g)
    (gate(*plain) * w).sum().backward()
    kept = {}

    def pack(t):
        kept[id(t.untyped_storage())] = t.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = recompute(gate, *ours)
    assert sum(s.nbytes() for s in kept.values()) == sum(t.nbytes for t in ours)
    (out * w).sum().backward()
    for name, a, e in zip(("y", "x", "z", "D"), ours, plain):
        assert torch.equal(a.grad, e.grad), name
