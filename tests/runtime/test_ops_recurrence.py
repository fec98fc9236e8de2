"""Chunk-by-chunk recurrences (runtime/ops_recurrence.py) through the two ops built on them: the gated delta rule
(runtime/ops_delta.py, both decays) and lightning attention (runtime/ops_lightning.py).

Their backward recomputes everything from the saved inputs, so it is checked three ways: against autograd
through the float64 token-loop oracle (1e-10: same maths, different association), with gradcheck's finite
differences (float64, its default tolerances), and by what the forward saves (nothing but its inputs and the
given start state). Shapes are tiny, the lengths not multiples of the chunk (the last chunk is shorter).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

from ltmdsl.runtime import ops_delta, ops_lightning, ops_recurrence

F64 = torch.float64


def delta_inputs(decay: str, *, B=1, T=7, Hk=1, Hv=2, Dk=3, Dv=2, seed=0):
    """q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], g (log-decay <= 0, one per head or per key channel), beta, start state."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    g = -F.softplus(randn(B, T, Hv, Dk) if decay == "kda" else randn(B, T, Hv)) / 2
    return [randn(B, T, Hk, Dk), randn(B, T, Hk, Dk), randn(B, T, Hv, Dv), g, torch.sigmoid(randn(B, T, Hv)),
            randn(B, Hv, Dk, Dv)]


def lightning_inputs(*, B=1, T=7, H=2, D=3, seed=0):
    """q, k, v [B,T,H,D] (SiLU'd, as MiniMax feeds them), the slopes [H], a start state [B,H,D,D]."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (F.silu(torch.randn(B, T, H, D, generator=gen, dtype=F64)) for _ in range(3))
    return [q, k, v, ops_lightning.minimax_slopes(H, 1, 4), torch.randn(B, H, D, D, generator=gen, dtype=F64)]


def delta(chunk):
    def fn(q, k, v, g, beta, state):
        return ops_delta.gated_delta_chunked(q, k, v, g, beta, chunk=chunk, state=state, l2norm=True, scale=None)
    return fn


def delta_oracle(q, k, v, g, beta, state):
    return ops_delta.gated_delta_reference(q, k, v, g, beta, state=state, l2norm=True, scale=None)


def lightning(chunk):
    def fn(q, k, v, slope, state):
        return ops_lightning.lightning_attention(q, k, v, slope, chunk=chunk, state=state)
    return fn


def lightning_oracle(q, k, v, slope, state):
    return ops_lightning.lightning_attention_reference(q, k, v, slope, state=state)


CASES = {  # name -> (inputs, chunked op of chunk 3, its token-loop oracle)
    "gdn": (lambda **kw: delta_inputs("gdn", **kw), delta(3), delta_oracle),
    "kda": (lambda **kw: delta_inputs("kda", **kw), delta(3), delta_oracle),
    "lightning": (lightning_inputs, lightning(3), lightning_oracle),
}


def grads(fn, args, cotangents):
    """Gradients of sum(o * do) + sum(s * ds) with respect to every argument."""
    leaves = [t.clone().requires_grad_() for t in args]
    o, s = fn(*leaves)
    ((o * cotangents[0]).sum() + (s * cotangents[1]).sum()).backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("T", [7, 20], ids=["3-chunks", "7-chunks"])
def test_backward_matches_autograd_through_the_token_loop(case, T):
    """Every input's gradient (the start state's and the slopes' too), from both outputs' cotangents; 7 chunks
    make three segments of recomputed start states (3 + 3 + 1)."""
    make, op, oracle = CASES[case]
    args = make(T=T)
    o, s = oracle(*args)
    gen = torch.Generator().manual_seed(1)
    cot = (torch.randn(o.shape, generator=gen, dtype=F64), torch.randn(s.shape, generator=gen, dtype=F64))
    for i, (got, want) in enumerate(zip(grads(op, args, cot), grads(oracle, args, cot))):
        assert_close(got, want, 1e-10, f"{case}: gradient of input {i}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("given_state", [True, False], ids=["given-state", "zero-state"])
def test_gradcheck(case, given_state):
    """Finite differences in float64 (T = 5 in chunks of 3: 3 + 2)."""
    make, op, _ = CASES[case]
    args = [t.clone().requires_grad_() for t in make(T=5)]
    if given_state:
        assert torch.autograd.gradcheck(op, tuple(args))
    else:
        assert torch.autograd.gradcheck(lambda *a: op(*a, None), tuple(args[:-1]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_saves_only_its_inputs(case):
    """What autograd keeps for backward is the inputs (and the given start state), nothing the op computed."""
    make, op, _ = CASES[case]
    args = [t.clone().requires_grad_() for t in make(T=10)]
    inputs = {t.untyped_storage().data_ptr() for t in args}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        o, s = op(*args)
    assert saved, "nothing saved: the op did not run under autograd"
    assert {t.untyped_storage().data_ptr() for t in saved} <= inputs


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_checkpointed_forward_keeps_nothing_alive(case):
    """Under torch.utils.checkpoint (full recompute) nothing the op was given stays referenced after its forward
    (a tensor held by the Function's context, outside save_for_backward, would leak through every layer)."""
    make, op, _ = CASES[case]
    args = make()
    x = args[0].clone().requires_grad_()
    refs = []

    def fn(x, *rest):
        q = x * 2  # an intermediate that only the op could keep alive
        refs.append(StorageWeakRef(q.untyped_storage()))
        return op(q, *rest)

    o, s = checkpoint(fn, x, *args[1:], use_reentrant=False)
    assert refs[0].expired()
    (o.sum() + s.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_gradients_the_same_output(case):
    """`run` (no autograd) and the Function's forward give the same outputs and final state."""
    make, op, _ = CASES[case]
    args = make()
    with torch.no_grad():
        o, s = op(*args)
    ot, st = op(*[t.clone().requires_grad_() for t in args])
    assert not o.requires_grad and ot.requires_grad
    assert_close(ot.detach(), o, 0.0, "output")
    assert_close(st.detach(), s, 0.0, "final state")


def test_run_writes_each_chunk_into_one_output():
    """A toy recurrence, the running sum S_c = S_{c-1} + sum of the chunk, o = S before the chunk: the output
    is one tensor of the requested trailing shape and dtype, T not a multiple of the chunk."""
    x = torch.arange(10, dtype=F64).reshape(1, 10, 1)  # [B, T, 1]

    def step(s, xc):
        return s.expand(xc.shape), s + xc.sum(1)

    o, s = ops_recurrence.run(step, 4, torch.zeros(1, 1, dtype=F64), (x,), (), (1,), torch.float32)
    assert o.dtype == torch.float32 and o.shape == (1, 10, 1)
    assert o[0, :, 0].tolist() == [0.0] * 4 + [6.0] * 4 + [28.0] * 2
    assert s.item() == 45.0
