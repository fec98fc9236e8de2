"""Variable tracking: the answer is re-derived independently by resolving every assignment in the text."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltmdsl.evals import CharTokenizer, TaskError
from ltmdsl.evals.vt import TASK, VtOptions

STATEMENT = re.compile(r"VAR ([A-Z]+) = (VAR ([A-Z]+)|(\d+))\. ")


def rederive(sample):
    """(names holding the asked value in order of assignment, the asked value), from the decoded text."""
    text = CharTokenizer().decode(sample.tokens)
    body, question = text.split("\nQuestion: ", 1)
    value = re.search(r"assigned the value (\d+) in the text above", question).group(1)
    holds = {}
    order = []
    for m in STATEMENT.finditer(body):
        name = m.group(1)
        assert name not in holds, "a variable is assigned twice"
        holds[name] = m.group(4) if m.group(4) else holds[m.group(3)]  # a use always follows its definition
        order.append(name)
    return [n for n in order if holds[n] == value], value, len(order)


@pytest.mark.parametrize("hops,chains", [(1, 1), (4, 1), (3, 3), (8, 2)], ids=["1hop", "4hop", "3chains", "8hop"])
def test_answer_matches_an_independent_derivation(hops, chains):
    options = VtOptions(context=1200, hops=hops, chains=chains)
    for index in range(5):
        sample = TASK.generate(options, 11, index)
        names, value, statements = rederive(sample)
        assert statements == chains * (hops + 1)
        assert sample.answers == (" ".join(names),)
        assert len(names) == hops + 1
        assert f"{hops + 1} variables are assigned the value {value}, they are: " in CharTokenizer().decode(
            sample.tokens)


@settings(max_examples=40, deadline=None)
@given(hops=st.integers(1, 6), chains=st.integers(1, 4), extra=st.integers(0, 500), seed=st.integers(0, 2**32),
       index=st.integers(0, 10**6))
def test_any_valid_options_give_a_derivable_sample(hops, chains, extra, seed, index):
    options = VtOptions(context=420 + 40 * hops * chains + extra, hops=hops, chains=chains)
    sample = TASK.generate(options, seed, index)
    assert len(sample) == options.context
    names, _, _ = rederive(sample)
    assert sample.answers == (" ".join(names),)
    start, end = sample.answer_spans[0]
    assert CharTokenizer().decode(sample.tokens[start:end]) == sample.answers[0]


def test_statements_are_spread_through_the_filler():
    options = VtOptions(context=8000, hops=4)
    text = CharTokenizer().decode(TASK.generate(options, 0, 0).tokens)
    offsets = [m.start() / len(text) for m in STATEMENT.finditer(text)]
    assert max(offsets) - min(offsets) > 0.3


def test_too_small_a_context_is_a_clear_error():
    with pytest.raises(TaskError, match=r"vt: context 200 cannot hold 2 chains of 4 hops .* at least \d+ tokens"):
        VtOptions(context=200, chains=2)
