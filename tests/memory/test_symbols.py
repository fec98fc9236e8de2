"""The memory model's symbolic maxima (`symbols.Largest`): exact at numbers, flattened while symbolic, and the
only maximum the model builds (sympy.Max compares its arguments pairwise by symbolic proof: a model holding
every kind took 13 CPU seconds to report, against a contract of well under one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sympy

from ltmdsl.memory.symbols import B, C, Largest, T, compile_exact, formula_text

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


@pytest.mark.parametrize("package", ["ltmdsl/memory", "ltmdsl/kinds"])
def test_the_model_takes_no_sympy_max(package):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / package).glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bsympy\.Max\(", line)
            and p.name != "symbols.py"]
    assert not hits, f"use symbols.Largest, not sympy.Max: {hits}"
