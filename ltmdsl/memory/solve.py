"""Solving, not only evaluating: largest context and batch, smallest GPU count, dominant component.

Every component is non-decreasing in T and B (Min, ceiling and sums of non-negative terms keep that),
and non-increasing in the data-parallel degree, so each question is a monotone predicate on integers.
`largest_true` answers it exactly on the integer formulas with an exponential search followed by a
bisection: about 2*log2(answer) exact evaluations, each a few microseconds, and no float anywhere.
The piecewise `min(T, W)` needs no special case: a sliding-window model whose memory stops growing at
T = W is simply reported as unbounded (None) when it fits at the search cap.
"""

from __future__ import annotations

import functools
from typing import Callable

from ltmdsl.memory.assemble import StageExprs
from ltmdsl.memory.symbols import compile_bytes

#: Contexts and batches beyond this are "unbounded" (2^62 tokens is far past any real context).
SEARCH_CAP = 2**62


class CompiledStages:
    """All stages' combined component expressions compiled into one exact integer function.

    `values(T, B, C, dp)` -> one {component: bytes} dict per stage, each value rounded up to bytes. The last
    points evaluated are remembered: checking a budget's limits at one context asks for the same point once
    per limit and once for the GPU's capacity.
    """

    def __init__(self, stages: list[StageExprs], components: tuple[str, ...]):
        self.components = components
        self.n_stages = len(stages)
        self._fn = functools.lru_cache(maxsize=16)(compile_bytes([st.combined[c] for st in stages for c in components]))

    def values(self, T: int, B: int, C: int, dp: int = 1) -> list[dict[str, int]]:
        flat = self._fn(T, B, C, dp)
        k = len(self.components)
        return [dict(zip(self.components, flat[i * k:(i + 1) * k])) for i in range(self.n_stages)]

    def stage_totals(self, T: int, B: int, C: int, dp: int = 1) -> list[int]:
        return [sum(v.values()) for v in self.values(T, B, C, dp)]

    def max_stage_total(self, T: int, B: int, C: int, dp: int = 1) -> int:
        return max(self.stage_totals(T, B, C, dp))


def largest_true(pred: Callable[[int], bool], lo: int = 1, cap: int = SEARCH_CAP) -> int | None:
    """The largest n >= lo with pred(n), for a predicate that is true then false.

    Returns lo - 1 when pred(lo) is false and None when pred(cap) is still true (unbounded).
    """
    if not pred(lo):
        return lo - 1
    good = lo
    step = max(lo, 1)
    while True:
        probe = good + step
        if probe > cap:
            if pred(cap):
                return None
            bad = cap
            break
        if not pred(probe):
            bad = probe
            break
        good = probe
        step *= 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if pred(mid):
            good = mid
        else:
            bad = mid
    return good


def smallest_true(pred: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The smallest n in [lo, hi] with pred(n), for a predicate that is false then true; else None."""
    if not pred(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def dominant(components: dict[str, int]) -> str | None:
    """The component holding the most bytes (None when everything is zero)."""
    name, value = max(components.items(), key=lambda kv: kv[1], default=(None, 0))
    return name if value > 0 else None
