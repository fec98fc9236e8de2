"""HashHop (Magic.dev, 2024): follow chains of random hashes through a shuffled list of assignments.

The format is that of Magic's public generator (github.com/magicproduct/hash-hop, `hashhop/generate.py`):

- hashes are `hash_length` random letters from a-zA-Z (all distinct within a sample);
- each chain has `hops` links `H1 = H2`, `H2 = H3`, ...; the chain's last link is quoted, `H2 = 'H3'`;
- every link is a line and all lines are shuffled, so a chain cannot be read off by position;
- the completion starts `COMPLETION:\\nHops={hops}\\n\\nCoT={True|False}\\n\\n` and lists one query per line,
  `H1 = 'H3'` without chain of thought, or every hop `H1 = 'H2 = H3'` with it, and ends with a newline.

`mixed_hops` is for training: sample i then has chains of 1 + i % hops links (its `Hops=` line says
which; fewer links leave room for more chains), so every batch teaches every depth up to `hops` and one
run is scored at each of them. Evaluation scores one depth at a time:
`ltmdsl eval` leaves this option out of the trained options it starts from (`Task.train_only`).

Here the prompt and the completion are one character-level sample, `bos prompt \\n completion pad...`,
sized in tokens (one token per character) rather than Magic's characters: the number of chains is as many
as fit in `context` beside the completion. The answers, the text between a query's quotes, are the only
targets: a training run learns the completion's answers, an evaluation scores them by exact match.
Random hashes cannot be compressed or guessed, so accuracy measures recall, not language modelling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ltmdsl.evals.layout import char_sample
from ltmdsl.evals.sample import Sample
from ltmdsl.evals.task import Task, TaskError, check, check_int, rng
from ltmdsl.evals.tokenizer import CharTokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class HashHopOptions:
    """`context` tokens; chains of `hops` links between `hash_length`-letter hashes; `queries` questions."""

    context: int = 2048
    hops: int = 2
    hash_length: int = 16
    queries: int = 1
    cot: bool = False
    mixed_hops: bool = False

    def __post_init__(self) -> None:
        check_int("hashhop", "context", self.context, 2)
        check_int("hashhop", "hops", self.hops, 1)
        check_int("hashhop", "hash_length", self.hash_length, 1)
        check_int("hashhop", "queries", self.queries, 1)
        check("hashhop", isinstance(self.cot, bool), f"cot must be true or false (got {self.cot!r})")
        check("hashhop", isinstance(self.mixed_hops, bool),
              f"mixed_hops must be true or false (got {self.mixed_hops!r})")
        if self.mixed_hops:
            for hops in range(1, self.hops):  # each depth a sample may have is checked as its own options
                try:
                    dataclasses.replace(self, hops=hops, mixed_hops=False)
                except TaskError as e:
                    detail = str(e).removeprefix("hashhop: ")
                    raise TaskError(f"hashhop: with mixed_hops, the {hops}-hop samples: {detail}") from None
        need = minimum_context(self)
        check("hashhop", self.context >= need,
              f"context {self.context} holds fewer than queries={self.queries} chains of {self.hops} hops "
              f"with {self.hash_length}-letter hashes; it needs at least {need} tokens "
              f"(lower hops, hash_length or queries, or raise context)")
        hashes = n_chains(self) * (self.hops + 1)
        check("hashhop", len(LETTERS) ** self.hash_length >= 2 * hashes,
              f"{hashes} distinct hashes of {self.hash_length} letters do not exist with room to spare; "
              f"raise hash_length")


def _chain_chars(options: HashHopOptions) -> int:
    """Characters of one chain in the prompt: its lines, quotes of the last, and a newline per line."""
    return options.hops * (2 * options.hash_length + 4) + 2


def answer_length(options: HashHopOptions) -> int:
    """Characters of one answer: the last hash, or with chain of thought every hash after the first."""
    if options.cot:
        return options.hops * options.hash_length + 3 * (options.hops - 1)
    return options.hash_length


def completion_header(options: HashHopOptions) -> str:
    return f"COMPLETION:\nHops={options.hops}\n\nCoT={options.cot}\n\n"


def _completion_chars(options: HashHopOptions) -> int:
    line = options.hash_length + len(" = ''") + answer_length(options) + 1  # with its newline
    return len(completion_header(options)) + options.queries * line


def n_chains(options: HashHopOptions) -> int:
    """How many chains fit: bos + prompt (chains, lines joined by newlines) + newline + completion."""
    room = options.context - 1 - _completion_chars(options)  # prompt plus its separating newline
    return max(room // _chain_chars(options), 0)


def minimum_context(options: HashHopOptions) -> int:
    return 1 + _completion_chars(options) + options.queries * _chain_chars(options)


@dataclass(frozen=True)
class HashHopText:
    """One problem as text: `prompt` (the shuffled lines), `completion`, and `targets` {query: answer}."""

    prompt: str
    completion: str
    targets: dict[str, str]


def _distinct_hashes(gen: np.random.Generator, count: int, length: int) -> np.ndarray:
    """[count, length] uint8 letters, rows pairwise distinct, in draw order (redrawing collisions)."""
    letters = np.frombuffer(LETTERS.encode(), dtype=np.uint8)
    rows = np.empty((0, length), dtype=np.uint8)
    while len(rows) < count:
        rows = np.concatenate([rows, letters[gen.integers(0, len(letters), size=(count - len(rows), length))]])
        _, first = np.unique(rows.view(f"V{length}").ravel(), return_index=True)
        rows = rows[np.sort(first)]
    return rows


def texts(options: HashHopOptions, seed: int, index: int) -> HashHopText:
    """The prompt, completion and targets of sample `index` under `seed`."""
    gen = rng(seed, index)
    hops, length = options.hops, options.hash_length
    count = n_chains(options)
    letters = _distinct_hashes(gen, count * (hops + 1), length).reshape(count, hops + 1, length)
    hashes = [[row.tobytes().decode() for row in chain] for chain in letters]
    lines = []
    for chain in hashes:
        lines.extend(f"{chain[j]} = {chain[j + 1]}" for j in range(hops - 1))
        lines.append(f"{chain[hops - 1]} = '{chain[hops]}'")  # quotes mark the end of a chain
    prompt = "\n".join(lines[i] for i in gen.permutation(len(lines)))
    asked = gen.choice(count, size=options.queries, replace=False)
    targets = {}
    for c in asked.tolist():
        chain = hashes[c]
        targets[chain[0]] = " = ".join(chain[1:]) if options.cot else chain[-1]
    completion = completion_header(options) + "".join(f"{k} = '{v}'\n" for k, v in targets.items())
    return HashHopText(prompt=prompt, completion=completion, targets=targets)


def sample_options(options: HashHopOptions, index: int) -> HashHopOptions:
    """The options sample `index` is drawn with: `options` itself, or under `mixed_hops` its depth 1 + index % hops."""
    if not options.mixed_hops:
        return options
    return dataclasses.replace(options, hops=1 + index % options.hops, mixed_hops=False)


def generate(options: HashHopOptions, seed: int, index: int) -> Sample:
    options = sample_options(options, index)
    problem = texts(options, seed, index)
    text = problem.prompt + "\n" + problem.completion
    spans = []
    at = len(problem.prompt) + 1 + len(completion_header(options))
    for key, value in problem.targets.items():
        start = at + len(key) + len(" = '")
        spans.append((start, start + len(value)))
        at = start + len(value) + len("'\n")
    return char_sample("hashhop", text, spans, options.context, {
        "task": "hashhop", "seed": seed, "index": index, "hops": options.hops, "cot": options.cot,
        "chains": n_chains(options), "queries": tuple(problem.targets)})


def tokenizer(options: HashHopOptions) -> CharTokenizer:
    return CharTokenizer("hashhop")


TASK = Task("hashhop", "follow chains of random hashes through shuffled assignments (Magic.dev)",
            HashHopOptions, generate, tokenizer, train_only=("mixed_hops",))
