"""How long a trace would take, roughly, so that a budget too large to trace is refused with advice.

On fake tensors time is Python dispatch: a fixed number of ops per sub-layer, plus the iterations of the loops
its reference code runs, which each runtime kind states (`RuntimeKind.trace_loops`: the chunked scans and
rules visit T/chunk chunks, attention a chunk's query blocks against cached keys or a window's, the MoE its
experts). `estimate_ops` counts those steps for the traced step (forward; training adds the backward and
recompute, about 3x) and `check` refuses more than OP_LIMIT, suggesting the largest context (a power of two)
that fits.
"""

from __future__ import annotations

import math

from ltmdsl.ir import ModelIR
from ltmdsl.memory.assemble import stage_ranges
from ltmdsl.memory.settings import Settings

OPS_PER_LAYER = 40  # dispatches of one sub-layer's forward outside its loops
OPS_PER_STEP = 30  # dispatches of one iteration of a sequence loop
OP_LIMIT = 400_000  # about two minutes of fake-tensor dispatch on one busy core


class TooLargeToTrace(ValueError):
    """The trace would take too long; the message suggests a context that traces in reasonable time."""


def _loop_steps(layer, tokens: int, keys: int) -> int:
    """Sequence-loop iterations of one sub-layer over `tokens` queries against `keys` keys: its runtime kind's
    `trace_loops` facet."""
    from ltmdsl.runtime.kinds import runtime_kind

    return runtime_kind(layer.kind).trace_loops(layer.mixer, tokens, keys)


def estimate_ops(ir: ModelIR, s: Settings, stage: int) -> int:
    """Dispatches of the traced step on stage `stage` (module docstring)."""
    tokens = s.context if s.mode == "training" else min(s.chunk, s.context)
    layers = stage_ranges(len(ir.layers), s.pp)[stage]
    ops = sum(OPS_PER_LAYER + OPS_PER_STEP * _loop_steps(ir.layers[i], tokens, s.context) for i in layers)
    if s.mode == "training":
        ops *= 3 * s.parallel.pp  # backward and recompute; up to pp micro-batches in flight
    return ops


def check(ir: ModelIR, s: Settings, stage: int) -> None:
    """Refuse (TooLargeToTrace) a step estimated above OP_LIMIT dispatches, suggesting a smaller context."""
    ops = estimate_ops(ir, s, stage)
    if ops <= OP_LIMIT:
        return
    import dataclasses

    fits = None
    t = 1 << max(0, s.context.bit_length() - 1)
    while t >= 1:
        if estimate_ops(ir, dataclasses.replace(s, context=t, chunk=min(s.chunk, t)), stage) <= OP_LIMIT:
            fits = t
            break
        t //= 2
    advice = (f"; check it at a smaller context, e.g. --context {fits}" if fits else
              "; even one token is too many for this model's depth")
    raise TooLargeToTrace(
        f"tracing the {s.mode} step of {ir.name!r} at context {s.context:,} would dispatch about {ops:,} "
        f"fake-tensor ops (limit {OP_LIMIT:,}), too long to trace in reasonable time{advice}"
    )
