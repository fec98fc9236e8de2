"""Copying: reproduce a random sequence after a separator (the classic sanity task for sequence models).

Named `copying` so that it never shadows the standard library's `copy` inside the package. The task's own
vocabulary: 0 = pad, 1 = separator, data tokens `2 .. vocab_size - 1`. A sample is
`x1 .. xL SEP x1 .. xL pad...`; the copy is one answer, right only if every token is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltmdsl.evals.sample import Sample, spans_to_mask
from ltmdsl.evals.task import Task, check, check_int, rng
from ltmdsl.evals.tokenizer import TaskVocab

PAD_ID, SEPARATOR = 0, 1


@dataclass(frozen=True)
class CopyOptions:
    """Copy `length` tokens (none: as many as fit, `(context - 1) // 2`) in `context` tokens."""

    context: int = 64
    length: int | None = None
    vocab_size: int = 16

    def __post_init__(self) -> None:
        check_int("copy", "context", self.context, 3)
        check_int("copy", "vocab_size", self.vocab_size, 3)
        if self.length is not None:
            check_int("copy", "length", self.length, 1)
            check("copy", 2 * self.length + 1 <= self.context,
                  f"length {self.length} twice plus a separator does not fit context {self.context}; "
                  f"it needs at least {2 * self.length + 1} tokens")

    @property
    def copy_length(self) -> int:
        return self.length if self.length is not None else (self.context - 1) // 2


def generate(options: CopyOptions, seed: int, index: int) -> Sample:
    gen = rng(seed, index)
    n = options.copy_length
    data = gen.integers(2, options.vocab_size, n)
    tokens = np.full(options.context, PAD_ID, dtype=np.int64)
    tokens[:n] = data
    tokens[n] = SEPARATOR
    tokens[n + 1:2 * n + 1] = data
    spans = ((n + 1, 2 * n + 1),)
    return Sample(task="copy", tokens=tokens, answer_mask=spans_to_mask(options.context, spans),
                  answer_spans=spans, answers=(" ".join(map(str, data.tolist())),),
                  metadata={"task": "copy", "seed": seed, "index": index, "length": n})


def tokenizer(options: CopyOptions) -> TaskVocab:
    return TaskVocab("copy", options.vocab_size)


TASK = Task("copy", "reproduce a random sequence after a separator", CopyOptions, generate, tokenizer)
