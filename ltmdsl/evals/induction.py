"""Induction head (the synthetic of H3, Fu et al., 2023): recall the token that followed a trigger.

The task's own vocabulary: 0 = pad (unused), 1 = trigger, data tokens `2 .. vocab_size - 1`. A sample is
random data tokens with the trigger once at a random position followed by some token v; the sample ends
`trigger v`, and v (the last token) is the answer: a model must find the earlier trigger and copy what
came after it, the mechanism of induction heads (Olsson et al., 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltmdsl.evals.sample import Sample, spans_to_mask
from ltmdsl.evals.task import Task, check_int, rng
from ltmdsl.evals.tokenizer import TaskVocab

TRIGGER = 1


@dataclass(frozen=True)
class InductionOptions:
    """A trigger hidden in `context` tokens of a `vocab_size` vocabulary."""

    context: int = 64
    vocab_size: int = 16

    def __post_init__(self) -> None:
        check_int("induction", "context", self.context, 4)
        check_int("induction", "vocab_size", self.vocab_size, 3)


def generate(options: InductionOptions, seed: int, index: int) -> Sample:
    gen = rng(seed, index)
    t = options.context
    tokens = gen.integers(2, options.vocab_size, t).astype(np.int64)
    at = int(gen.integers(0, t - 3))  # the trigger and its successor stay before the final pair
    value = int(tokens[at + 1])
    tokens[at] = TRIGGER
    tokens[t - 2] = TRIGGER
    tokens[t - 1] = value
    spans = ((t - 1, t),)
    return Sample(task="induction", tokens=tokens, answer_mask=spans_to_mask(t, spans), answer_spans=spans,
                  answers=(str(value),),
                  metadata={"task": "induction", "seed": seed, "index": index, "trigger_at": at})


def tokenizer(options: InductionOptions) -> TaskVocab:
    return TaskVocab("induction", options.vocab_size)


TASK = Task("induction", "recall the token after an earlier trigger (induction head)", InductionOptions,
            generate, tokenizer)
