"""Tokenizers for the eval tasks: characters, bytes, or a task's own integer vocabulary.

All three reserve the same special ids, so a trainer can pad any batch the same way:

    0 = pad, 1 = bos (start of a sample), 2 = eos (end of a text window)

- `CharTokenizer` (hashhop, niah, vt): the fixed alphabet `\\n` then printable ASCII (space .. `~`), ids 3..98,
  99 ids in all. Any other character is refused with an error naming it, never mapped to an "unknown" id:
  an unknown id would let a model score on text it cannot see.
- `ByteTokenizer` (text from a user's file): byte b is id b + 3, 259 ids in all; every file encodes.
- `TaskVocab` (mqar, copy, induction): the task draws ids directly from `range(size)`; ids it gives a
  meaning (separators, triggers) are documented by the task.

`fits(vocab)` tells whether a spec's vocabulary can hold every id, and raises `VocabError` naming both
numbers when it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # id of ALPHABET[i] is N_SPECIAL + i


class VocabError(ValueError):
    """A spec's vocabulary is too small for a task's tokenizer, or a text has a character it cannot encode."""


def _check_fits(vocab: int, need: int, what: str) -> None:
    if vocab < need:
        raise VocabError(f"the spec's vocab is {vocab} but {what} needs {need} token ids; "
                         f"raise the spec's vocab to at least {need}")


@dataclass(frozen=True)
class CharTokenizer:
    """Character-level ids over `ALPHABET`; refuses any other character."""

    task: str = "text"

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + len(ALPHABET)

    def fits(self, vocab: int) -> None:
        _check_fits(vocab, self.vocab_size, f"the {self.task} task's character tokenizer")

    def encode(self, text: str) -> np.ndarray:
        """[len(text)] int32 ids, or `VocabError` naming the first character outside the alphabet."""
        table = _char_table()
        raw = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per element
        ids = np.where(raw < 128, table[np.minimum(raw, 127)], -1)
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            i = int(bad[0])
            raise VocabError(f"character {text[i]!r} at offset {i} is not in the {self.task} task's "
                             f"alphabet (newline and printable ASCII)")
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """Text of `ids`; special ids are dropped (pads after an answer are not text)."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= N_SPECIAL) & (ids < self.vocab_size)]
        return "".join(ALPHABET[i - N_SPECIAL] for i in ids.tolist())


def _char_table() -> np.ndarray:
    table = np.full(128, -1, dtype=np.int64)
    for i, char in enumerate(ALPHABET):
        table[ord(char)] = N_SPECIAL + i
    return table


@dataclass(frozen=True)
class ByteTokenizer:
    """Byte-level ids for arbitrary files: byte b is id b + 3."""

    task: str = "text"

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + 256

    def fits(self, vocab: int) -> None:
        _check_fits(vocab, self.vocab_size, f"the {self.task} task's byte tokenizer")

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + N_SPECIAL

    def decode(self, ids) -> bytes:
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[(ids >= N_SPECIAL) & (ids < self.vocab_size)]
        return (ids - N_SPECIAL).astype(np.uint8).tobytes()


@dataclass(frozen=True)
class TaskVocab:
    """A task's own integer vocabulary `range(size)`; ids are the tokens, there is nothing to encode."""

    task: str
    size: int

    @property
    def vocab_size(self) -> int:
        return self.size

    def fits(self, vocab: int) -> None:
        _check_fits(vocab, self.size, f"the {self.task} task (its vocab_size option)")

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in np.asarray(ids).tolist())
