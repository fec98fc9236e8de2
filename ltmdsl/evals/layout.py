"""Laying a character-level text out in a context: bos, the text, then pads up to exactly `context` tokens.

Tasks build their text and the character ranges of its answers; this module turns both into a `Sample`
whose answer spans point at token positions (a character at offset i sits at position i + 1, after bos).
Padding goes at the end, after every answer, so a causal model never sees a pad before it answers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ltmdsl.evals.sample import Sample, spans_to_mask
from ltmdsl.evals.tokenizer import BOS, PAD, CharTokenizer


def char_sample(task: str, text: str, answer_chars: Sequence[tuple[int, int]], context: int,
                metadata: Mapping[str, Any]) -> Sample:
    """A `Sample` of `[bos] + text + [pad] * (context - 1 - len(text))`; the text must fit (tasks size it)."""
    if len(text) + 1 > context:
        raise AssertionError(f"{task}: text of {len(text)} characters does not fit {context} tokens")
    tokens = np.full(context, PAD, dtype=np.int32)
    tokens[0] = BOS
    tokens[1:len(text) + 1] = CharTokenizer(task).encode(text)
    spans = tuple((start + 1, end + 1) for start, end in answer_chars)
    answers = tuple(text[start:end] for start, end in answer_chars)
    return Sample(task=task, tokens=tokens, answer_mask=spans_to_mask(context, spans), answer_spans=spans,
                  answers=answers, metadata=metadata)
