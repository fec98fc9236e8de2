"""Multi-query associative recall (Zoology, Arora et al., 2023), after its `multiquery_ar` generator.

The task's own vocabulary `range(vocab_size)`: keys come from `1 .. vocab_size // 2 - 1`, values from
`vocab_size // 2 .. vocab_size - 1`, disjoint halves. The sample opens with `num_kv_pairs` pairs
`k1 v1 k2 v2 ...` (distinct keys, distinct values); the rest is a query region of pairs of positions in
which each key is asked once, `k_i v_i`, at pair slot g_i drawn without replacement with probability
proportional to `(g + 1) ** (power_a - 1)`: a power law, most queries soon after the pairs, a few far.
The value after each queried key is the answer: loss and accuracy apply only there. Every other position
is a random token of the whole vocabulary (Zoology's `random_non_queries`) or 0.

Unlike Zoology, which keeps noise in the input at answer positions and puts the value in a separate label
array, the value sits in the token stream itself, so one sequence serves teacher forcing and decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltmdsl.evals.sample import Sample, spans_to_mask
from ltmdsl.evals.task import Task, check, check_int, rng
from ltmdsl.evals.tokenizer import TaskVocab


@dataclass(frozen=True)
class MqarOptions:
    """`num_kv_pairs` pairs from a `vocab_size` vocabulary, all queried, in `context` tokens."""

    context: int = 64
    num_kv_pairs: int = 4
    vocab_size: int = 256
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self) -> None:
        check_int("mqar", "context", self.context, 4)
        check_int("mqar", "num_kv_pairs", self.num_kv_pairs, 1)
        check_int("mqar", "vocab_size", self.vocab_size, 4)
        check("mqar", isinstance(self.power_a, (int, float)) and not isinstance(self.power_a, bool)
              and 0 < self.power_a <= 1, f"power_a must be in (0, 1] (got {self.power_a!r})")
        check("mqar", isinstance(self.random_non_queries, bool),
              f"random_non_queries must be true or false (got {self.random_non_queries!r})")
        keys = self.vocab_size // 2 - 1
        check("mqar", self.num_kv_pairs <= keys,
              f"num_kv_pairs={self.num_kv_pairs} needs that many distinct keys but vocab_size="
              f"{self.vocab_size} has {keys} (ids 1..{keys}); raise vocab_size to at least "
              f"{2 * self.num_kv_pairs + 2}")
        check("mqar", self.context >= 4 * self.num_kv_pairs,
              f"context {self.context} cannot hold {self.num_kv_pairs} pairs and as many queries; "
              f"it needs at least {4 * self.num_kv_pairs} tokens")


def query_slots(options: MqarOptions) -> int:
    """Pair slots in the query region, each a (key, value) position pair."""
    return (options.context - 2 * options.num_kv_pairs) // 2


def gap_probabilities(options: MqarOptions) -> np.ndarray:
    """[query_slots] probability of asking at slot g before renormalising: `a * (g + 1) ** (a - 1)`."""
    a = options.power_a
    p = a * np.arange(1, query_slots(options) + 1, dtype=np.float64) ** (a - 1)
    return p / p.sum()


def generate(options: MqarOptions, seed: int, index: int) -> Sample:
    gen = rng(seed, index)
    n, half = options.num_kv_pairs, options.vocab_size // 2
    keys = gen.choice(np.arange(1, half), size=n, replace=False)
    values = gen.choice(np.arange(half, options.vocab_size), size=n, replace=False)
    gaps = gen.choice(query_slots(options), size=n, replace=False, p=gap_probabilities(options))
    tokens = np.zeros(options.context, dtype=np.int64)
    tokens[0:2 * n:2] = keys
    tokens[1:2 * n:2] = values
    at = 2 * n + 2 * gaps  # [n] positions of the queried keys
    tokens[at] = keys
    tokens[at + 1] = values
    if options.random_non_queries:
        free = np.ones(options.context, dtype=bool)
        free[:2 * n] = False
        free[at] = False
        free[at + 1] = False
        tokens[free] = gen.integers(0, options.vocab_size, int(free.sum()))
    order = np.argsort(at)
    spans = tuple((int(at[i]) + 1, int(at[i]) + 2) for i in order)
    return Sample(task="mqar", tokens=tokens, answer_mask=spans_to_mask(options.context, spans),
                  answer_spans=spans, answers=tuple(str(int(values[i])) for i in order),
                  metadata={"task": "mqar", "seed": seed, "index": index,
                            "keys": tuple(int(k) for k in keys), "values": tuple(int(v) for v in values),
                            "gaps": tuple(int(g) for g in gaps)})


def tokenizer(options: MqarOptions) -> TaskVocab:
    return TaskVocab("mqar", options.vocab_size)


TASK = Task("mqar", "multi-query associative recall over disjoint key and value vocabularies (Zoology)",
            MqarOptions, generate, tokenizer)
