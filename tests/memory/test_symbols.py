"""The memory model's symbolic extrema (`symbols.Largest`, `symbols.Smallest`): exact at numbers, flattened while
symbolic, and the only maximum and minimum the model builds (sympy.Max and sympy.Min compare their arguments
pairwise by symbolic proof: a model holding every kind took 13 CPU seconds to report with sympy.Max, against a
contract of well under one, and sympy.Min was half of what `ltmdsl check` spent on ltm-100m's budgets)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sympy

from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, compile_exact, formula_text

ROOT = Path(__file__).resolve().parents[2]


def test_largest_is_the_number_once_every_argument_is():
    assert Largest(3, 7, 5) == 7
    expr = Largest(2 * T, T + 100, 64)
    assert expr.subs(T, 10) == 110
    assert expr.subs(T, 1000) == 2000
    assert compile_exact(expr)(1000, 1, 1) == 2000 and compile_exact(expr)(10, 1, 1) == 110


def test_largest_flattens_drops_repeats_and_folds_numbers():
    nested = Largest(Largest(T, 5), Largest(T, B, 9), 2)
    assert set(nested.args) == {T, B, sympy.Integer(9)}
    assert Largest(T) == T and Largest(T, T) == T
    assert formula_text(Largest(T * B, C)).startswith("max(")


def test_smallest_is_the_number_once_every_argument_is():
    assert Smallest(3, 7, 5) == 3
    window = Smallest(T, 4096)  # a sliding window's keys: piecewise in T
    assert window.subs(T, 100) == 100 and window.subs(T, 10**6) == 4096
    fn = compile_exact(2 * window + Smallest(1, T - C))
    assert fn(100, 1, 100) == 200 and fn(10**6, 1, 1024) == 8193
    assert fn(10**6, 1, 1024) == (2 * window + Smallest(1, T - C)).subs({T: 10**6, C: 1024})


def test_smallest_flattens_drops_repeats_and_folds_numbers():
    nested = Smallest(Smallest(T, 5), Smallest(T, B, 9), 20)
    assert set(nested.args) == {T, B, sympy.Integer(5)}
    assert Smallest(T) == T and Smallest(T, T) == T
    assert formula_text(Smallest(T * B, C)).startswith("min(")
    # a min inside a max stays itself: only the same extremum flattens
    mixed = Largest(Smallest(T, 4), B)
    assert set(mixed.args) == {Smallest(T, 4), B}
    assert compile_exact(mixed)(10, 2, 1) == 4 and compile_exact(mixed)(3, 2, 1) == 3


@pytest.mark.parametrize(("package", "call", "ours"), [
    ("ltmdsl/memory", "Max", "Largest"), ("ltmdsl/kinds", "Max", "Largest"),
    ("ltmdsl/memory", "Min", "Smallest"), ("ltmdsl/kinds", "Min", "Smallest"),
], ids=["memory-max", "kinds-max", "memory-min", "kinds-min"])
def test_the_model_takes_no_sympy_extremum(package, call, ours):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / package).glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(rf"\bsympy\.{call}\(", line)
            and p.name != "symbols.py"]
    assert not hits, f"use symbols.{ours}, not sympy.{call}: {hits}"
