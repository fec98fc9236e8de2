"""Needle in a haystack: key-value facts hidden at chosen depths of filler, then asked back.

The needle is RULER's (Hsieh et al., 2024) `The special magic number for KEY is: VALUE. ` with a random
lowercase key and a random number, hidden among the passkey test's filler sentences. The question,
`What is the special magic number for KEY? The special magic number for KEY is: VALUE`, follows the
haystack; VALUE is the answer. With several needles the others are distractors of the same form, and
`queries` of them (the first ones) are asked in turn.

`depth` places needle 0 after that fraction of the filler (0 = the haystack's start, 1 = its end), at the
nearest sentence boundary, which is what a depth-by-length heat map varies; the other needles, and needle 0 when
`depth` is none, go at random sentence boundaries. Too easy alone (RULER's point), it is kept as a sanity
check.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltmdsl.evals.filler import LONGEST, filler
from ltmdsl.evals.layout import char_sample
from ltmdsl.evals.sample import Sample
from ltmdsl.evals.task import Task, check, check_int, rng
from ltmdsl.evals.tokenizer import CharTokenizer

LOWER = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class NiahOptions:
    """`needles` facts in `context` tokens, needle 0 at `depth` (none: random); `queries` of them asked."""

    context: int = 2048
    depth: float | None = 0.5
    needles: int = 1
    queries: int = 1
    key_length: int = 8
    value_digits: int = 7

    def __post_init__(self) -> None:
        check_int("niah", "context", self.context, 2)
        check_int("niah", "needles", self.needles, 1)
        check_int("niah", "queries", self.queries, 1)
        check_int("niah", "key_length", self.key_length, 1)
        check_int("niah", "value_digits", self.value_digits, 1)
        if self.depth is not None:
            check("niah", isinstance(self.depth, (int, float)) and not isinstance(self.depth, bool)
                  and 0.0 <= self.depth <= 1.0, f"depth must be between 0 and 1, or none (got {self.depth!r})")
        check("niah", self.queries <= self.needles,
              f"queries={self.queries} asks more needles than needles={self.needles}")
        check("niah", len(LOWER) ** self.key_length >= 2 * self.needles,
              f"{self.needles} distinct keys of {self.key_length} letters do not exist; raise key_length")
        need = _fixed_chars(self) + 1 + LONGEST
        check("niah", self.context >= need,
              f"context {self.context} cannot hold {self.needles} needles, {self.queries} questions and "
              f"filler; it needs at least {need} tokens")


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is: {value}. "


def _question(key: str) -> str:
    return f"\nWhat is the special magic number for {key}? The special magic number for {key} is: "


def _fixed_chars(options: NiahOptions) -> int:
    """Characters that are not filler: needles, questions with their answers, and the closing newline."""
    key, value = "k" * options.key_length, "1" * options.value_digits
    return (options.needles * len(_needle(key, value))
            + options.queries * (len(_question(key)) + len(value)) + 1)


def generate(options: NiahOptions, seed: int, index: int) -> Sample:
    gen = rng(seed, index)
    keys: list[str] = []
    while len(keys) < options.needles:
        key = "".join(LOWER[i] for i in gen.integers(0, len(LOWER), options.key_length))
        if key not in keys:
            keys.append(key)
    values = [str(gen.integers(1, 10)) + "".join(str(d) for d in gen.integers(0, 10, options.value_digits - 1))
              for _ in keys]
    sentences = filler(options.context - 1 - _fixed_chars(options))
    slots = gen.integers(0, len(sentences) + 1, options.needles)  # a needle goes before sentence slot
    if options.depth is not None:
        slots[0] = int(options.depth * len(sentences) + 0.5)  # nearest boundary, halves up
    pieces: list[str] = []
    needle_at = [0] * options.needles  # character offset of each needle in the haystack
    filler_before = [0] * options.needles  # filler characters before it: its depth's numerator
    at = filler_at = 0
    for slot in range(len(sentences) + 1):
        for n in range(options.needles):
            if slots[n] == slot:
                needle_at[n], filler_before[n] = at, filler_at
                pieces.append(_needle(keys[n], values[n]))
                at += len(pieces[-1])
        if slot < len(sentences):
            pieces.append(sentences[slot])
            at += len(sentences[slot])
            filler_at += len(sentences[slot])
    haystack = "".join(pieces)
    text, spans = haystack, []
    for n in range(options.queries):
        text += _question(keys[n])
        spans.append((len(text), len(text) + len(values[n])))
        text += values[n]
    text += "\n"
    return char_sample("niah", text, spans, options.context, {
        "task": "niah", "seed": seed, "index": index, "keys": tuple(keys), "values": tuple(values),
        "needle_offsets": tuple(needle_at), "haystack_chars": len(haystack),
        "depths": tuple(f / max(filler_at, 1) for f in filler_before)})


def tokenizer(options: NiahOptions) -> CharTokenizer:
    return CharTokenizer("niah")


TASK = Task("niah", "needles (key, number) at chosen depths of filler, asked back", NiahOptions, generate,
            tokenizer)
