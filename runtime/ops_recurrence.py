"""Chunk-by-chunk recurrences that keep only their inputs for backward, as fused chunk kernels do.

A chunked linear-recurrent op (the gated delta rule, lightning attention) is a sequential map over chunks of
C tokens: with S_0 the start state,
    (o_c, S_{c+1}) = step(S_c, x_c)          x_c the c-th chunk of every sequence input, o_c its output
`run` applies it chunk after chunk, writing each o_c into one preallocated output, so no more than one
chunk's temporaries (in the work dtype) exist at a time: the prefill workspace of the op is its output plus
one chunk's working set, whatever the number of tokens.

`chunked` does the same under autograd through `ChunkedRecurrence`, a custom Function that saves only the
sequence inputs and the start state (flash-linear-attention's chunk kernels likewise save q, k, v, g, beta
and recompute the chunk states in backward: Yang et al., "Gated Delta Networks", ICLR 2025, and its
`chunk_gated_delta_rule`). Its backward recomputes the chunk-start states without autograd, keeping one
every ~sqrt(n) chunks, then walks the segments between them backwards: a segment's start states are
recomputed (a transient of about 2 sqrt(n) states in all, where the fused kernels recompute all n), and each
of its chunks, last first, is re-run under autograd from its start state and differentiated against
(dL/do_c, dL/dS_{c+1}), giving the chunk's input gradients and dL/dS_c. Plain autograd through the chunked
form would instead keep every chunk's fp32 intermediates until the backward reaches them.

`step` must be a pure function of its tensor arguments: the chunk of each sequence input and the inputs given
whole (a layer's decay slopes), which get their gradients too; tensors it closes over would not. The
Function's context holds no tensor outside save_for_backward (the zero start state is made by `new_state`,
which must not close over one either), so under torch.utils.checkpoint nothing outlives the forward.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # step(state, *chunk inputs, *whole) -> (o_c, next state)


def _chunks(seq: tuple[torch.Tensor, ...], lo: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """Tokens lo .. lo + chunk of every sequence input (dim 1)."""
    return tuple(t[:, lo:lo + chunk] for t in seq)


def run(step: Step, chunk: int, state: torch.Tensor, seq: tuple[torch.Tensor, ...], whole: tuple[torch.Tensor, ...],
        out: tuple[int, ...], out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `step` chunk after chunk: seq inputs [B, T, ...] (sequence on dim 1), `whole` inputs given to every
    step as they are, state in the work dtype -> (o [B, T, *out] in out_dtype, final state). The output is
    allocated first and each chunk's part written into it as it is made."""
    B, T = seq[0].shape[:2]
    o = seq[0].new_empty(B, T, *out, dtype=out_dtype)  # [B, T, *out]
    for lo in range(0, T, chunk):
        oc, state = step(state, *_chunks(seq, lo, chunk), *whole)  # [B, n, *out], the next state
        o[:, lo:lo + chunk] = oc
        del oc
    return o, state


def _starts(step: Step, chunk: int, state: torch.Tensor, seq: tuple[torch.Tensor, ...],
            whole: tuple[torch.Tensor, ...], first: int, last: int, every: int = 1) -> list[torch.Tensor]:
    """The start states of chunks first, first + every, ... below `last`, recomputed without autograd from
    `state`, the start state of chunk `first`."""
    starts = []
    with torch.no_grad():
        for c in range(first, last):
            if (c - first) % every == 0:
                starts.append(state)
            if c + 1 < last:
                _, state = step(state, *_chunks(seq, c * chunk, chunk), *whole)
    return starts


class ChunkedRecurrence(torch.autograd.Function):
    """`run` whose backward recomputes (module docstring). Saves the inputs and the given start state only;
    `new_state()` makes the zero start state when none is given (nothing is saved for it). The first
    `n_seq` tensors are sequence inputs, cut into chunks; the rest are given whole to every step (their
    gradients are summed over the chunks)."""

    @staticmethod
    def forward(ctx, step: Step, chunk: int, out: tuple[int, ...], out_dtype: torch.dtype,
                new_state: Callable[[], torch.Tensor], n_seq: int, state: torch.Tensor | None, *inputs: torch.Tensor):
        ctx.step, ctx.chunk, ctx.new_state, ctx.n_seq = step, chunk, new_state, n_seq
        ctx.has_state = state is not None
        ctx.save_for_backward(state, *inputs)
        seq, whole = inputs[:n_seq], inputs[n_seq:]
        return run(step, chunk, new_state() if state is None else state, seq, whole, out, out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: torch.Tensor, dfinal: torch.Tensor):
        state, *inputs = ctx.saved_tensors
        step, chunk, n = ctx.step, ctx.chunk, ctx.n_seq
        seq, whole = tuple(inputs[:n]), tuple(inputs[n:])
        n_chunks = -(-seq[0].shape[1] // chunk)
        every = math.isqrt(n_chunks - 1) + 1  # segments of about sqrt(n) chunks
        marks = _starts(step, chunk, ctx.new_state() if state is None else state, seq, whole, 0, n_chunks, every)
        need = ctx.needs_input_grad[7:]
        grads = [torch.zeros_like(t) if wanted else None for wanted, t in zip(need, inputs)]
        ds = dfinal
        for j in range(len(marks) - 1, -1, -1):  # segments, last first: their start states, then each chunk
            first = j * every
            starts = _starts(step, chunk, marks[j], seq, whole, first, min(first + every, n_chunks))
            marks[j] = None
            for c in range(first + len(starts) - 1, first - 1, -1):
                part = slice(c * chunk, (c + 1) * chunk)
                leaves = [t[:, part].detach().requires_grad_() for t in seq]
                leaves += [t.detach().requires_grad_() for t in whole]
                s0 = starts[c - first].detach().requires_grad_()
                starts[c - first] = None  # each start state is freed once its chunk is done
                with torch.enable_grad():
                    oc, s1 = step(s0, *leaves)  # [B, n, ...], the next state
                got = torch.autograd.grad((oc, s1), (s0, *leaves), (do[:, part].to(oc.dtype), ds), allow_unused=True)
                ds = got[0]
                for i, (g, d) in enumerate(zip(grads, got[1:])):
                    if g is None or d is None:
                        continue
                    if i < n:
                        g[:, part] = d
                    else:
                        g += d
                del oc, s1, got, leaves, s0
        dstate = ds.to(state.dtype) if ctx.has_state and ctx.needs_input_grad[6] else None
        return (None, None, None, None, None, None, dstate, *grads)


def chunked(step: Step, chunk: int, state: torch.Tensor | None, seq: tuple[torch.Tensor, ...],
            whole: tuple[torch.Tensor, ...] = (), *, out: tuple[int, ...], out_dtype: torch.dtype,
            new_state: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, *out] in out_dtype, final state): `run` when nothing needs a gradient, else `ChunkedRecurrence`
    (the inputs and the given start state saved, everything else recomputed in backward)."""
    tracked = [t for t in (state, *seq, *whole) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return ChunkedRecurrence.apply(step, chunk, out, out_dtype, new_state, len(seq), state, *seq, *whole)
    return run(step, chunk, new_state() if state is None else state, seq, whole, out, out_dtype)
