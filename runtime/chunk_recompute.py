"""Backward by recomputation for the recurrent kinds: a chunked recurrence run one chunk at a time whose backward
recomputes each chunk from its saved start state (`run_chunks`), and a region that keeps only its inputs
(`recompute`).

The chunked scans of the recurrent kinds (ops_scan, ops_ssd, ops_mlstm, ops_rglru) each define one *chunk
step*: from the state entering a chunk and the chunk's slice of the per-token inputs, the chunk's outputs
and the state leaving it. `run_chunks` applies it chunk after chunk and is the whole forward pass:

    forward    chunk after chunk (T/L Python steps), each chunk's output written into one preallocated
               output [B, T, ...] in the inputs' dtype, so only one chunk's work-dtype temporaries are ever
               live (inference prefill and the training forward alike)
    saved      what the fused kernels keep (state-spaces/mamba's selective_scan and ssd_combined, the
               xLSTM and RG-LRU kernels): the inputs the op was given and the state entering every chunk,
               nothing of the chunk's fp32 internals
    backward   the chunks in reverse: each is recomputed under autograd from its saved start state and
               back-propagated at once (the output's gradient slice and the gradient reaching its end
               state), giving its inputs' gradient slice, the shared inputs' gradient (summed over
               chunks) and the gradient of its start state, which flows into the chunk before it; one
               chunk's internals are live at a time

`recompute(fn, *inputs)` is the same idea for a layer's elementwise work around its scan (gates, the D skip,
norms, computed in fp32): autograd keeps fn's inputs and nothing of its fp32 internals, and the backward
runs fn again under autograd; the inputs are saved through `save_for_backward`, so saved-tensor hooks (and
`ltmdsl memory --measure`) see them. Parameters used inside fn are passed as inputs to receive gradients.

Both recompute under the autocast state of their forward. Without autograd (no input needs a gradient, or grad
mode is off) nothing is saved. The gradient is that of
the chunk step's own autograd graph, chunk by chunk: exactly what autograd through the whole chunked
form gives (tests/runtime/test_chunk_recompute.py checks both against the float64 token-loop oracles).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

#: step(seq chunk inputs, shared inputs, state tensors) -> (chunk output [B, L, ...], state tensors)
ChunkStep = Callable[[tuple, tuple, tuple], tuple[torch.Tensor, tuple]]


def _autocast_state(tensors) -> tuple[str, bool, torch.dtype]:
    """(device type, autocast enabled, its dtype) where the forward runs: the backward recomputes under the
    same autocast state (as torch.utils.checkpoint does), so the recomputed graph is the forward's."""
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _autocast(state: tuple[str, bool, torch.dtype]):
    device, enabled, dtype = state
    return torch.autocast(device_type=device, dtype=dtype, enabled=enabled)


def _slice(t: torch.Tensor | None, c0: int, c1: int) -> torch.Tensor | None:
    return None if t is None else t[:, c0:c1]


def _forward(step: ChunkStep, seq: Sequence, shared: Sequence, state: tuple, chunk: int, T: int, out_dtype,
             keep_starts: bool) -> tuple[torch.Tensor, tuple, list[tuple]]:
    """Chunk after chunk: (y [B, T, ...] in out_dtype, final state, the state entering each chunk if asked)."""
    y = None
    starts: list[tuple] = []
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        if keep_starts:
            starts.append(state)
        yc, state = step(tuple(_slice(t, c0, c1) for t in seq), tuple(shared), state)  # [B, L, ...]
        state = tuple(_own(s) for s in state)
        if y is None:
            y = yc.new_empty(yc.shape[0], T, *yc.shape[2:], dtype=out_dtype)  # [B, T, ...]
        y[:, c0:c1] = yc
        del yc
    return y, state, starts


def _own(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy when it views a larger storage (h_t[:, -1] of a chunk's [B, L, ...] states):
    a kept start state must not keep its chunk's whole storage alive."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


class _ChunkRecompute(torch.autograd.Function):
    """The autograd node of `run_chunks` (module docstring): saves the inputs and the chunk start states."""

    @staticmethod
    def forward(ctx, step, chunk, out_dtype, n_seq, n_shared, *tensors):
        seq, shared = tensors[:n_seq], tensors[n_seq:n_seq + n_shared]
        state = tuple(tensors[n_seq + n_shared:])
        T = next(t for t in seq if t is not None).shape[1]
        y, final, starts = _forward(step, seq, shared, state, chunk, T, out_dtype, keep_starts=True)
        ctx.step, ctx.chunk, ctx.T, ctx.n_seq, ctx.n_shared, ctx.n_state = step, chunk, T, n_seq, n_shared, len(state)
        ctx.none = [t is None for t in seq]
        ctx.amp = _autocast_state(tensors)
        ctx.save_for_backward(*[t for t in seq if t is not None], *shared, *[s for st in starts for s in st])
        ctx.mark_non_differentiable(*[s for s in final if not s.is_floating_point()])
        return (y, *final)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, *dfinal):
        saved = list(ctx.saved_tensors)
        seq = [None if none else saved.pop(0) for none in ctx.none]
        shared = saved[:ctx.n_shared]
        flat = saved[ctx.n_shared:]
        starts = [tuple(flat[i:i + ctx.n_state]) for i in range(0, len(flat), ctx.n_state)]
        need = ctx.needs_input_grad[5:]
        need_seq, need_shared = need[:ctx.n_seq], need[ctx.n_seq:ctx.n_seq + ctx.n_shared]
        need_state0 = need[ctx.n_seq + ctx.n_shared:]
        dseq = [torch.zeros_like(t) if n else None for t, n in zip(seq, need_seq)]  # [B, T, ...] each
        dshared = [torch.zeros_like(t) if n else None for t, n in zip(shared, need_shared)]
        dstate = list(dfinal)
        bounds = [(c0, min(c0 + ctx.chunk, ctx.T)) for c0 in range(0, ctx.T, ctx.chunk)]
        for k in reversed(range(len(bounds))):
            c0, c1 = bounds[k]
            with torch.enable_grad(), _autocast(ctx.amp):
                xs = tuple(None if t is None else t[:, c0:c1].detach().requires_grad_(n)
                           for t, n in zip(seq, need_seq))
                ps = tuple(t.detach().requires_grad_(n) for t, n in zip(shared, need_shared))
                wants_start = need_state0 if k == 0 else [s.is_floating_point() for s in starts[k]]
                h0 = tuple(s.detach().requires_grad_(w) for s, w in zip(starts[k], wants_start))
                yc, h1 = ctx.step(xs, ps, h0)
                outs = [yc] + [s for s, g in zip(h1, dstate) if g is not None and s.requires_grad]
                grads = [dy[:, c0:c1].to(yc.dtype)] + [g for s, g in zip(h1, dstate)
                                                       if g is not None and s.requires_grad]
                wanted = [t for t in (*xs, *ps, *h0) if t is not None and t.requires_grad]
                got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True) if wanted else ())
            for i, t in enumerate(xs):
                if t is not None and t.requires_grad:
                    g = next(got)
                    if g is not None:
                        dseq[i][:, c0:c1] = g
            for i, t in enumerate(ps):
                if t.requires_grad:
                    g = next(got)
                    if g is not None:
                        dshared[i] += g
            dstate = [next(got) if t.requires_grad else None for t in h0]
            del xs, ps, h0, yc, h1, outs, grads
        return (None, None, None, None, None, *dseq, *dshared, *dstate)


def run_chunks(step: ChunkStep, seq: Sequence[torch.Tensor | None], shared: Sequence[torch.Tensor],
               state: Sequence[torch.Tensor], *, chunk: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, tuple]:
    """Run `step` over chunks of `chunk` tokens (module docstring).

    seq: per-token inputs [B, T, ...] (None allowed, passed through as None); shared: whole inputs (the decay
    parameters); state: the state entering the first chunk. Returns (y [B, T, ...] in out_dtype, final state).
    Under autograd the backward recomputes each chunk from its saved start state; otherwise nothing is saved.
    """
    tensors = (*seq, *shared, *state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, *final = _ChunkRecompute.apply(step, chunk, out_dtype, len(seq), len(shared), *tensors)
        return y, tuple(final)
    T = next(t for t in seq if t is not None).shape[1]
    with torch.no_grad():
        y, final, _ = _forward(step, seq, shared, tuple(state), chunk, T, out_dtype, keep_starts=False)
    return y, final


class _Recompute(torch.autograd.Function):
    """The autograd node of `recompute`: saves fn's inputs, recomputes fn under autograd in backward."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn, ctx.amp = fn, _autocast_state(inputs)
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        need = ctx.needs_input_grad[1:]
        with torch.enable_grad(), _autocast(ctx.amp):
            xs = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, need)]
            out = ctx.fn(*xs)
            wanted = [x for x in xs if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad(out, wanted, dout, allow_unused=True) if wanted else ())
        return (None, *[next(got) if x is not None and x.requires_grad else None for x in xs])


def recompute(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> torch.Tensor:
    """fn(*inputs) -> one tensor; under autograd only `inputs` are kept and fn runs again in the backward
    (module docstring). Every tensor fn differentiates, parameters included, must be one of `inputs`."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _Recompute.apply(fn, *inputs)
    return fn(*inputs)
