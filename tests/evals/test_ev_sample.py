"""Sample: read-only arrays, a mask that must match the spans, content equality."""

import numpy as np
import pytest

from ltmdsl.evals import Sample


def make(**overrides):
    fields = dict(task="t", tokens=[1, 5, 6, 7, 0], answer_mask=[False, False, True, True, False],
                  answer_spans=[(2, 4)], answers=["x"], metadata={"k": 1})
    fields.update(overrides)
    return Sample(**fields)


def test_arrays_are_read_only_copies():
    tokens = np.array([1, 5, 6, 7, 0])
    sample = make(tokens=tokens)
    tokens[0] = 9
    assert sample.tokens[0] == 1
    with pytest.raises(ValueError):
        sample.tokens[0] = 3
    with pytest.raises(TypeError):
        sample.metadata["k"] = 2


@pytest.mark.parametrize("overrides,needle", [
    (dict(answer_mask=[False, True, True, True, False]), "exactly on the answer spans"),
    (dict(answer_spans=[(0, 2)], answer_mask=[True, True, False, False, False]), "not inside positions"),
    (dict(answer_spans=[(2, 9)]), "not inside positions"),
    (dict(answers=["x", "y"]), "2 answers for 1 answer spans"),
    (dict(answer_mask=[False, True]), "equal length"),
], ids=["mask-off-span", "position-0", "past-end", "answer-count", "lengths"])
def test_inconsistent_samples_are_refused(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        make(**overrides)


def test_equality_is_by_content():
    assert make() == make()
    assert make() != make(tokens=[1, 5, 6, 8, 0])
    assert make() != make(metadata={"k": 2})
