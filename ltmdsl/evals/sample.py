"""One generated example: token ids, the answer spans a model must produce, and what was asked.

Every task produces the same `Sample`, so training, evaluation and batching never special-case a task.
Positions follow next-token prediction: `tokens[t]` is the token at position t, and `answer_mask[t]` is True
when `tokens[t]` is an answer token, the target the model must predict from `tokens[:t]`. A trainer applies
the loss to the logits at t - 1 wherever `answer_mask[t]` is True; nothing else is ever a target.

Arrays are numpy (no torch here), read-only, so a sample can be shared between batches safely; a context of
millions of tokens costs 4 bytes per token (int32) plus one per token for the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np


def _frozen_array(values, dtype) -> np.ndarray:
    array = np.array(values, dtype=dtype)  # a copy: the caller's buffer stays the caller's
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Sample:
    """A task example of exactly `len(tokens)` tokens.

    `answer_spans` are half-open `(start, end)` token ranges, one per question, in the order asked;
    `answer_mask` is True exactly on those ranges. `answers` holds each span's text (or its token ids
    written as text for tasks with their own vocabulary). `metadata` records what was generated (the
    task, seed, index and task-specific facts such as needle depths) for reports and debugging.
    """

    task: str
    tokens: np.ndarray  # [T] int32
    answer_mask: np.ndarray  # [T] bool
    answer_spans: tuple[tuple[int, int], ...]
    answers: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tokens = _frozen_array(self.tokens, np.int32)
        mask = _frozen_array(self.answer_mask, np.bool_)
        if tokens.ndim != 1 or mask.shape != tokens.shape:
            raise ValueError(f"tokens {tokens.shape} and answer_mask {mask.shape} must be one row of equal length")
        spans = tuple((int(a), int(b)) for a, b in self.answer_spans)
        expected = np.zeros_like(mask)
        for start, end in spans:
            if not 0 < start < end <= len(tokens):  # position 0 has no prefix to predict it from
                raise ValueError(f"answer span {(start, end)} is not inside positions 1..{len(tokens)}")
            expected[start:end] = True
        if not np.array_equal(expected, mask):
            raise ValueError("answer_mask must be True exactly on the answer spans")
        if len(self.answers) != len(spans):
            raise ValueError(f"{len(self.answers)} answers for {len(spans)} answer spans")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "answer_mask", mask)
        object.__setattr__(self, "answer_spans", spans)
        object.__setattr__(self, "answers", tuple(self.answers))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (self.task == other.task and np.array_equal(self.tokens, other.tokens)
                and np.array_equal(self.answer_mask, other.answer_mask)
                and self.answer_spans == other.answer_spans and self.answers == other.answers
                and dict(self.metadata) == dict(other.metadata))

    __hash__ = None  # equal samples compare by content; arrays are not hashable

    def answer_ids(self) -> list[np.ndarray]:
        """The token ids of each answer span, in order."""
        return [self.tokens[start:end] for start, end in self.answer_spans]


def spans_to_mask(length: int, spans) -> np.ndarray:
    """The [length] bool mask that is True exactly on the half-open `spans`."""
    mask = np.zeros(length, dtype=np.bool_)
    for start, end in spans:
        mask[start:end] = True
    return mask
