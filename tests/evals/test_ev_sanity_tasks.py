"""Copy, induction and text: the sanity tasks' layouts and their errors."""

import numpy as np
import pytest

from ltmdsl.evals import TASKS, TaskError, accuracy
from ltmdsl.evals.copying import SEPARATOR, CopyOptions
from ltmdsl.evals.induction import TRIGGER, InductionOptions
from ltmdsl.evals.text import TextOptions


@pytest.mark.parametrize("context,length", [(33, None), (40, 5), (11, 5)], ids=["fill", "short", "exact"])
def test_copy_layout(context, length):
    sample = TASKS["copy"].generate(CopyOptions(context=context, length=length, vocab_size=8), 0, 4)
    n = length or (context - 1) // 2
    tokens = sample.tokens
    assert len(tokens) == context and tokens[n] == SEPARATOR
    assert np.array_equal(tokens[:n], tokens[n + 1:2 * n + 1]) and (tokens[:n] >= 2).all()
    assert (tokens[2 * n + 1:] == 0).all() and sample.answer_spans == ((n + 1, 2 * n + 1),)


def test_copy_too_long_is_a_clear_error():
    with pytest.raises(TaskError, match="copy: length 10 twice plus a separator does not fit context 20"):
        CopyOptions(context=20, length=10)


@pytest.mark.parametrize("context", [4, 5, 64], ids=["min", "5", "64"])
def test_induction_answer_follows_the_earlier_trigger(context):
    options = InductionOptions(context=context, vocab_size=6)
    for index in range(30):
        tokens = TASKS["induction"].generate(options, 0, index).tokens
        triggers = np.flatnonzero(tokens == TRIGGER).tolist()
        assert len(triggers) == 2 and triggers[1] == context - 2
        assert tokens[-1] == tokens[triggers[0] + 1] and tokens[-1] != TRIGGER


def test_text_windows_come_from_the_file(tmp_path):
    data = bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))
    path = tmp_path / "corpus.bin"
    path.write_bytes(data)
    options = TextOptions(data=str(path), context=65)
    sample = TASKS["text"].generate(options, 0, 3)
    offset = sample.metadata["offset"]
    assert TASKS["text"].tokenizer(options).decode(sample.tokens) == data[offset:offset + 64]
    assert sample.answer_spans == ((1, 65),)
    half_wrong = sample.tokens.copy()
    half_wrong[1:33] = 0
    assert accuracy(half_wrong, sample) == 0.5


@pytest.mark.parametrize("kind,needle", [("missing", "does not exist"), ("empty-name", "needs a data file"),
                                         ("short", "has 10 bytes, fewer than a window")],
                         ids=["missing", "empty-name", "short"])
def test_text_file_errors(tmp_path, kind, needle):
    short = tmp_path / "short.txt"
    short.write_bytes(b"0123456789")
    data = {"missing": str(tmp_path / "nope.txt"), "empty-name": "", "short": str(short)}[kind]
    with pytest.raises(TaskError, match=needle):
        TextOptions(data=data, context=100)
