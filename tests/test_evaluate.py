"""The evaluator: every arithmetic path gives a value or an EvalError (a SpecError with a position from load)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ltmdsl
from ltmdsl import SpecError
from ltmdsl.evaluate import MAX_MAGNITUDE, EvalError, Scope, evaluate, parse_count
from ltmdsl.parser import parse

SPEC = "const c = {expr}\nmodel m {{ vocab = 256  d_model = 64  layer f = mlp(d_ff = 8)  stack {{ f }} }}\n"


def value(text: str):
    spec = parse(f"const x = {text}\n", "<t>")
    return evaluate(spec.items[0].value, Scope({}))


@pytest.mark.parametrize("text, expected", [
    ("2.5 ** 2", 6.25), ("2.0 ** -1", 0.5), ("2 ** 0.5", math.sqrt(2)), ("0.5 ** 2", 0.25), ("(-2.0) ** 3", -8.0),
    ("0.0 ** 2", 0.0), ("2.0 ** -2000", 0.0), ("1.0 ** 1e30", 1.0), ("(-1) ** (10 ** 30)", 1), ("2 ** 100", 2**100),
], ids=lambda v: str(v))
def test_powers(text, expected):
    assert value(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0.5 ** -10000", "too large"), ("0.0 ** -1", "division by zero"), ("0 ** -1", "negative integer exponent"),
    ("2 ** -1", "negative integer exponent"), ("(-8.0) ** 0.5", "not a real number"), ("10.0 ** 400", "too large"),
    ("2 ** 102", "too large"), ("3 ** 1000000000000", "too large"), ("1e30 * 1e30 * 1e30 * 1e30", "too large"),
    ("1.5 // 0", "division by zero"), ("2.0 ** 2 ** 2 ** 2 ** 2 ** 2", "too large"),
], ids=lambda v: str(v))
def test_bad_arithmetic_is_an_eval_error(text, message):
    with pytest.raises(EvalError, match=message):
        value(text)


def test_deep_operator_chain_is_a_spec_error_with_a_position():
    for expr in (" ** ".join(["2"] * 500), " + ".join(["1"] * 5000), "-" + " - -".join(["1"] * 3000)):
        with pytest.raises(SpecError) as info:
            ltmdsl.loads(SPEC.format(expr=expr))
        d = info.value.errors[0]
        assert d.line == 1 and d.col > 1 and "nested too deeply" in d.message


# ---- property: random arithmetic loads to a value or a SpecError, never anything else -------------

_atoms = st.one_of(st.integers(-10**6, 10**6).map(str), st.sampled_from(["0", "0.0", "2.5", "1e-5", "1e300", "0.5",
                                                                          "1.5K", "100M", "7", "1e23", "80 GB"]))


def _combine(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*", "/", "//", "%", "**"]), children).map(
            lambda t: f"{t[0]} {t[1]} {t[2]}"),
        children.map(lambda c: f"-{c}"),
        children.map(lambda c: f"({c})"),
        st.tuples(st.sampled_from(["min", "max", "cdiv"]), children, children).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
    )


@settings(max_examples=400, deadline=None)
@given(st.recursive(_atoms, _combine, max_leaves=12))
def test_random_arithmetic_gives_a_value_or_a_spec_error(expr):
    try:
        spec = ltmdsl.loads(SPEC.format(expr=expr))
    except SpecError as e:
        assert all(d.line >= 1 and d.col >= 1 for d in e.errors), e.render()
        return
    assert spec.model.vocab == 256


@settings(max_examples=300, deadline=None)
@given(st.recursive(_atoms, _combine, max_leaves=12))
def test_values_stay_bounded(expr):
    try:
        v = value(expr)
    except EvalError:
        return
    except SpecError:  # a parse-level refusal (an operator run) is fine too
        return
    assert isinstance(v, (int, float)) and not isinstance(v, complex)
    assert math.isfinite(v) and abs(v) <= MAX_MAGNITUDE


# ---- command-line counts: exactly as the spec reads them ---------------------------------------

@pytest.mark.parametrize("text, expected", [("1e23", 10**23), ("1.5K", 1500), ("2.5e3", 2500), ("1e6", 10**6),
                                            ("100M", 10**8), ("1_000", 1000)], ids=str)
def test_counts_are_exact(text, expected):
    assert parse_count(text) == expected
    assert type(parse_count(text)) is int


@pytest.mark.parametrize("text", ["1.5", "1e-3", "0.0005K", "1.0001e3", "1e40", "0e0"], ids=str)
def test_non_integer_or_out_of_range_counts_are_refused(text):
    with pytest.raises(ValueError):
        parse_count(text)


@pytest.mark.parametrize("text, hint", [("100m", "100M"), ("128ki", "128Ki"), ("1e3k", "1e3K")], ids=str)
def test_count_suffix_case_gets_a_hint(text, hint):
    with pytest.raises(ValueError, match=f"did you mean {hint}\\?"):
        parse_count(text)
