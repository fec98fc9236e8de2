"""RULER's variable tracking (Hsieh et al., 2024): which variables end up holding a value?

Each chain starts `VAR QPHBD = 12345.` and continues `VAR KDJSA = VAR QPHBD.` for `hops` more variables;
the statements of `chains` chains (each with its own value) are hidden in order among filler sentences,
interleaved at random. The question names chain 0's value, and the answer is every variable that holds it,
in the order they were assigned, separated by spaces: multi-hop by construction, since only the first
statement mentions the value. Variable names are `name_length` random capital letters, all distinct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltmdsl.evals.filler import LONGEST, filler
from ltmdsl.evals.layout import char_sample
from ltmdsl.evals.sample import Sample
from ltmdsl.evals.task import Task, check, check_int, rng
from ltmdsl.evals.tokenizer import CharTokenizer

UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


@dataclass(frozen=True)
class VtOptions:
    """`chains` chains of `hops` reassignments each, hidden in `context` tokens of filler."""

    context: int = 2048
    hops: int = 4
    chains: int = 1
    name_length: int = 5
    value_digits: int = 5

    def __post_init__(self) -> None:
        check_int("vt", "context", self.context, 2)
        check_int("vt", "hops", self.hops, 1)
        check_int("vt", "chains", self.chains, 1)
        check_int("vt", "name_length", self.name_length, 1)
        check_int("vt", "value_digits", self.value_digits, 1)
        names = self.chains * (self.hops + 1)
        check("vt", len(UPPER) ** self.name_length >= 2 * names,
              f"{names} distinct names of {self.name_length} letters do not exist; raise name_length")
        check("vt", 9 * 10 ** (self.value_digits - 1) >= 2 * self.chains,
              f"{self.chains} distinct values of {self.value_digits} digits do not exist; raise value_digits")
        need = _fixed_chars(self) + 1 + LONGEST
        check("vt", self.context >= need,
              f"context {self.context} cannot hold {self.chains} chains of {self.hops} hops with their "
              f"question and filler; it needs at least {need} tokens")


def _value_statement(name: str, value: str) -> str:
    return f"VAR {name} = {value}. "


def _copy_statement(name: str, previous: str) -> str:
    return f"VAR {name} = VAR {previous}. "


def _question(value: str, count: int) -> str:
    return (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
            f"Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
            f"are assigned the value {value}, they are: ")


def _fixed_chars(options: VtOptions) -> int:
    name, value = "N" * options.name_length, "1" * options.value_digits
    statements = options.chains * (len(_value_statement(name, value))
                                   + options.hops * len(_copy_statement(name, name)))
    answer = (options.hops + 1) * (options.name_length + 1) - 1
    return len(INTRO) + statements + len(_question(value, options.hops + 1)) + answer + 1


def generate(options: VtOptions, seed: int, index: int) -> Sample:
    gen = rng(seed, index)
    width = options.hops + 1
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < options.chains * width:
        name = "".join(UPPER[i] for i in gen.integers(0, len(UPPER), options.name_length))
        if name not in seen:
            seen.add(name)
            names.append(name)
    values: list[str] = []
    while len(values) < options.chains:
        value = str(gen.integers(10 ** (options.value_digits - 1) if options.value_digits > 1 else 0,
                                 10 ** options.value_digits))
        if value not in values:
            values.append(value)
    chains = [names[c * width:(c + 1) * width] for c in range(options.chains)]
    statements = []
    for chain, value in zip(chains, values):
        statements.append([_value_statement(chain[0], value)]
                          + [_copy_statement(chain[i], chain[i - 1]) for i in range(1, width)])
    order = gen.permutation(np.repeat(np.arange(options.chains), width))  # which chain speaks next
    cursor = [0] * options.chains
    in_order = []
    for c in order.tolist():
        in_order.append(statements[c][cursor[c]])
        cursor[c] += 1
    sentences = filler(options.context - 1 - _fixed_chars(options))
    slots = np.sort(gen.integers(0, len(sentences) + 1, len(in_order)))  # statement i before sentence slots[i]
    pieces, s = [INTRO], 0
    for slot in range(len(sentences) + 1):
        while s < len(in_order) and slots[s] == slot:
            pieces.append(in_order[s])
            s += 1
        if slot < len(sentences):
            pieces.append(sentences[slot])
    answer = " ".join(chains[0])
    text = "".join(pieces) + _question(values[0], width)
    spans = [(len(text), len(text) + len(answer))]
    text += answer + "\n"
    return char_sample("vt", text, spans, options.context, {
        "task": "vt", "seed": seed, "index": index, "value": values[0], "chains": tuple(map(tuple, chains)),
        "values": tuple(values)})


def tokenizer(options: VtOptions) -> CharTokenizer:
    return CharTokenizer("vt")


TASK = Task("vt", "RULER variable tracking: every variable a chain of assignments gives a value", VtOptions,
            generate, tokenizer)
