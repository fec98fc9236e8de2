"""Batches of samples as numpy arrays (no torch here): rows are samples `index`, `index + 1`, ... of a seed.

Because each sample depends only on `(seed, index)`, a batch is a pure function of its indices: a resumed
run that asks for the same indices gets the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ltmdsl.evals.sample import Sample
from ltmdsl.evals.task import Task


@dataclass(frozen=True, eq=False)
class Batch:
    """`tokens` [B, T] int64 and `answer_mask` [B, T] bool, stacked from `samples`."""

    tokens: np.ndarray  # [B, T] int64
    answer_mask: np.ndarray  # [B, T] bool
    samples: tuple[Sample, ...]

    def to_lists(self) -> tuple[list[list[int]], list[list[bool]]]:
        """Plain Python lists of the tokens and the mask, for callers that want no numpy."""
        return self.tokens.tolist(), self.answer_mask.tolist()


def make_batch(task: Task, options: Any, seed: int, indices: Sequence[int]) -> Batch:
    """The samples `indices` of `task` under `options` and `seed`, stacked (every sample is `context` long)."""
    samples = tuple(task.generate(options, seed, int(i)) for i in indices)
    if not samples:
        raise ValueError("a batch needs at least one index")
    tokens = np.stack([s.tokens for s in samples]).astype(np.int64)  # [B, T]
    mask = np.stack([s.answer_mask for s in samples])  # [B, T]
    return Batch(tokens=tokens, answer_mask=mask, samples=samples)
