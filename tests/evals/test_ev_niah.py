"""Needle in a haystack: depth placement, multi-needle questions, exact sizes."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltmdsl.evals import CharTokenizer, TaskError
from ltmdsl.evals.filler import LONGEST
from ltmdsl.evals.niah import TASK, NiahOptions

NEEDLE = re.compile(r"The special magic number for ([a-z]+) is: (\d+)\. ")
QUESTION = re.compile(r"\nWhat is the special magic number for ([a-z]+)\? The special magic number for \1 is: ")


def rederive(sample):
    """(needle offsets {key: (offset, value)}, haystack length, asked keys) from the decoded text."""
    text = CharTokenizer().decode(sample.tokens)
    haystack = text[:text.index("\nWhat is")]
    needles = {m.group(1): (m.start(), m.group(2)) for m in NEEDLE.finditer(haystack)}
    return needles, len(haystack), [m.group(1) for m in QUESTION.finditer(text)]


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0], ids=lambda d: f"depth{d}")
@pytest.mark.parametrize("context", [500, 4000], ids=["ctx500", "ctx4000"])
def test_needle_sits_at_the_chosen_depth(depth, context):
    sample = TASK.generate(NiahOptions(context=context, depth=depth), 0, 3)
    needles, length, asked = rederive(sample)
    (key, (offset, value)), = needles.items()
    assert asked == [key] and sample.answers == (value,)
    filler = length - len(f"The special magic number for {key} is: {value}. ")
    assert abs(offset / filler - depth) <= LONGEST / filler  # at the nearest sentence boundary
    assert sample.metadata["depths"][0] == offset / filler


@settings(max_examples=40, deadline=None)
@given(needles=st.integers(1, 5), data=st.data(), extra=st.integers(0, 600), seed=st.integers(0, 2**32),
       depth=st.one_of(st.none(), st.floats(0, 1)))
def test_any_valid_options_give_a_derivable_sample(needles, data, extra, seed, depth):
    queries = data.draw(st.integers(1, needles))
    options = NiahOptions(context=60 * needles + 90 * queries + 30 + extra, depth=depth, needles=needles,
                          queries=queries)
    sample = TASK.generate(options, seed, 0)
    assert len(sample) == options.context
    found, _, asked = rederive(sample)
    assert len(found) == needles and len(asked) == queries
    assert sample.answers == tuple(found[k][1] for k in asked)
    assert all(CharTokenizer().decode(sample.tokens[a:b]) == ans
               for (a, b), ans in zip(sample.answer_spans, sample.answers))


def test_random_depth_varies_between_samples():
    options = NiahOptions(context=3000, depth=None)
    depths = {round(TASK.generate(options, 0, i).metadata["depths"][0], 2) for i in range(20)}
    assert len(depths) > 5


@pytest.mark.parametrize("kwargs,needle", [
    (dict(depth=1.5), "depth must be between 0 and 1"),
    (dict(needles=2, queries=3), "asks more needles than needles=2"),
    (dict(context=50), "it needs at least"),
], ids=["depth", "queries", "context"])
def test_bad_options_are_clear_errors(kwargs, needle):
    with pytest.raises(TaskError, match=needle):
        NiahOptions(**kwargs)
