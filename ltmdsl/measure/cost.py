"""How long a trace would take, roughly, so that a budget too large to trace is refused with advice.

On fake tensors time is Python dispatch: a fixed number of ops per sub-layer, plus the kinds whose reference
code loops over the sequence (the Mamba-1 scan, the Mamba-2 SSD, the gated delta rule and lightning attention
visit T/chunk chunks; attention that needs
a causal mask or a chunk against cached keys, visits query blocks of `mask_rows` queries, a window blocks of
`window_rows`) and the
MoE's loop over experts. `estimate_ops` counts those steps for
the traced step (forward; training adds the backward and recompute, about 3x) and `check` refuses more than
OP_LIMIT, suggesting the largest context (a power of two) that fits.
"""

from __future__ import annotations

import math

from ltmdsl.ir import ModelIR
from ltmdsl.kinds.attention import mask_rows, window_rows
from ltmdsl.memory.assemble import stage_ranges
from ltmdsl.memory.settings import Settings

OPS_PER_LAYER = 40  # dispatches of one sub-layer's forward outside its loops
OPS_PER_STEP = 30  # dispatches of one iteration of a sequence loop
OP_LIMIT = 400_000  # about two minutes of fake-tensor dispatch on one busy core


class TooLargeToTrace(ValueError):
    """The trace would take too long; the message suggests a context that traces in reasonable time."""


def _loop_steps(layer, tokens: int, keys: int) -> int:
    """Sequence-loop iterations of one sub-layer over `tokens` queries against `keys` keys."""
    m = layer.mixer
    if layer.kind == "mamba":
        return math.ceil(tokens / 64)  # runtime/ops_scan.py chunks of 64 tokens
    if layer.kind in ("mamba2", "gated_deltanet", "kda", "lightning"):  # chunk by chunk (ops_recurrence for the last 3)
        return math.ceil(tokens / m.chunk)
    if layer.kind in ("attention", "mla") and getattr(m, "window", None) is None and keys > tokens:
        return math.ceil(tokens / mask_rows(keys))  # masked query blocks of a chunk against cached keys
    if layer.kind == "attention" and m.window is not None:
        rows = window_rows(m.window)  # query blocks of a window (runtime/ops_attention.py `attention`)
        return math.ceil(tokens / rows) if tokens > rows else 0
    if layer.kind == "moe":
        return m.experts
    return 0


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
