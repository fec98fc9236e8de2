"""A user's own corpus (`--task text --data FILE`): windows of bytes, every byte a target.

Byte-level (`ByteTokenizer`), so any file trains. Sample `index` is `bos` and the `context - 1` bytes at an
offset drawn from `(seed, index)`; the loss covers every position after bos. Accuracy is the fraction of
bytes predicted right (next-byte accuracy), since exact match of a whole window says nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ltmdsl.evals.sample import Sample, spans_to_mask
from ltmdsl.evals.task import Task, TaskError, check, check_int, rng
from ltmdsl.evals.tokenizer import BOS, ByteTokenizer


@dataclass(frozen=True)
class TextOptions:
    """Windows of `context` tokens (bos + bytes) from the file `data`."""

    data: str = ""
    context: int = 1024

    def __post_init__(self) -> None:
        check_int("text", "context", self.context, 2)
        check("text", isinstance(self.data, str) and self.data != "", "needs a data file (--data FILE)")
        check("text", os.path.isfile(self.data), f"data file '{self.data}' does not exist or is not a file")
        size = os.path.getsize(self.data)
        check("text", size >= self.context - 1,
              f"data file '{self.data}' has {size} bytes, fewer than a window of context - 1 = "
              f"{self.context - 1}; lower context")


def generate(options: TextOptions, seed: int, index: int) -> Sample:
    gen = rng(seed, index)
    window = options.context - 1
    size = os.path.getsize(options.data)
    offset = int(gen.integers(0, size - window + 1))
    with open(options.data, "rb") as f:
        f.seek(offset)
        data = f.read(window)
    if len(data) != window:
        raise TaskError(f"text: data file '{options.data}' changed while reading (short read at {offset})")
    tokens = np.empty(options.context, dtype=np.int64)
    tokens[0] = BOS
    tokens[1:] = ByteTokenizer("text").encode(data)
    spans = ((1, options.context),)
    return Sample(task="text", tokens=tokens, answer_mask=spans_to_mask(options.context, spans),
                  answer_spans=spans, answers=(data.decode("utf-8", errors="replace"),),
                  metadata={"task": "text", "seed": seed, "index": index, "offset": offset})


def byte_accuracy(predicted_ids: Sequence[int], sample: Sample) -> float:
    """Fraction of target bytes predicted right; `predicted_ids` aligned with the sample or targets only."""
    predicted = np.asarray(predicted_ids).reshape(-1)
    truth = sample.tokens[sample.answer_mask]
    if len(predicted) == len(sample.tokens):
        predicted = predicted[sample.answer_mask]
    elif len(predicted) != len(truth):
        raise TaskError(f"text: {len(predicted)} predicted ids; expected {len(sample.tokens)} (aligned with "
                        f"the sample) or {len(truth)} (the targets only)")
    return float(np.mean(predicted == truth))


def tokenizer(options: TextOptions) -> ByteTokenizer:
    return ByteTokenizer("text")


TASK = Task("text", "windows of a user's file, byte-level, every byte a target", TextOptions, generate,
            tokenizer, accuracy=byte_accuracy)
