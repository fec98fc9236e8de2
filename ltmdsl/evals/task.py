"""What a task is: typed frozen options, a deterministic generator, a tokenizer and an exact-match scorer.

A task's options are a frozen dataclass whose `__post_init__` validates every field and whether the
options fit their context, so invalid options never exist and `generate` cannot fail half-way.
`generate(options, seed, index)` depends on nothing but its arguments: sample `index` of a run seeded `seed`
is the same whatever batch it lands in and in whatever order samples are drawn, so a resumed run sees the
data an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ltmdsl.evals.sample import Sample


class TaskError(ValueError):
    """Bad task options or an unknown task; the message is one line that names the task and the fix."""


class Tokenizer(Protocol):
    vocab_size: int

    def fits(self, vocab: int) -> None: ...

    def decode(self, ids) -> Any: ...


def rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of sample `index` under `seed`: independent of every other sample's."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise TaskError(f"{name} must be a non-negative integer (got {value!r})")
    return np.random.default_rng([int(seed), int(index)])


def span_accuracy(predicted_ids: Sequence[int], sample: Sample) -> float:
    """Fraction of the sample's answers reproduced exactly (every token of the span right).

    `predicted_ids` is either aligned with the sample (`predicted_ids[t]` is the model's guess for
    `tokens[t]`, i.e. the argmax of the logits at t - 1, same length as the sample) or only the answer
    tokens, concatenated in span order (what a decoder emits when it is prompted with each prefix).
    """
    predicted = np.asarray(predicted_ids).reshape(-1)
    spans = sample.answer_spans
    n_answer = sum(end - start for start, end in spans)
    if len(predicted) == len(sample.tokens):
        pieces = [predicted[start:end] for start, end in spans]
    elif len(predicted) == n_answer:
        bounds = np.cumsum([0] + [end - start for start, end in spans])
        pieces = [predicted[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        raise TaskError(f"{sample.task}: {len(predicted)} predicted ids; expected {len(sample.tokens)} "
                        f"(aligned with the sample) or {n_answer} (the answer tokens only)")
    right = sum(np.array_equal(piece, truth) for piece, truth in zip(pieces, sample.answer_ids()))
    return right / len(spans)


@dataclass(frozen=True)
class Task:
    """One registered task. `options` is its frozen options dataclass (defaults are its field defaults)."""

    name: str
    summary: str
    options: type
    generate: Callable[[Any, int, int], Sample]
    tokenizer: Callable[[Any], Tokenizer]
    accuracy: Callable[[Sequence[int], Sample], float] = span_accuracy
    #: options that shape only the training stream (a mix of settings); evaluation starts without them
    train_only: tuple[str, ...] = ()

    def make_options(self, **values: Any) -> Any:
        """Options from keyword values (as a command line gives them), refusing unknown names by name."""
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; options are {', '.join(fields)}"
                raise TaskError(f"{self.name}: unknown option '{key}'{hint}")
        hints = typing.get_type_hints(self.options)
        converted = {key: _convert(self.name, key, value, hints[key]) for key, value in values.items()}
        return self.options(**converted)

    def defaults(self) -> Any:
        return self.options()


def _convert(task: str, key: str, value: Any, hint: Any) -> Any:
    """`value` as the option's type; strings from a command line are parsed, anything else type-checked."""
    allowed = [a for a in typing.get_args(hint)] if _is_union(hint) else [hint]
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if type(None) in allowed:
            return None
        raise TaskError(f"{task}: option '{key}' needs a value")
    for kind in allowed:
        if kind is type(None):
            continue
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif kind is int:
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value.replace("_", ""))
                except ValueError:
                    pass
        elif kind is float:
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif kind is str:
            if isinstance(value, str):
                return value
    names = " or ".join("none" if k is type(None) else k.__name__ for k in allowed)
    raise TaskError(f"{task}: option '{key}' must be {names} (got {value!r})")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def check(task: str, condition: bool, message: str) -> None:
    """Raise `TaskError("task: message")` unless `condition`; what every options `__post_init__` uses."""
    if not condition:
        raise TaskError(f"{task}: {message}")


def check_int(task: str, name: str, value: Any, minimum: int) -> None:
    """`value` is an int (not a bool) of at least `minimum`."""
    check(task, isinstance(value, int) and not isinstance(value, bool),
          f"{name} must be an integer (got {value!r})")
    check(task, value >= minimum, f"{name} must be at least {minimum} (got {value})")
