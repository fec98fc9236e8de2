"""The symbols of the memory model and exact integer evaluation of its sympy expressions.

Every memory component is a sympy expression in three symbols:

    T  context (tokens per sequence)
    B  batch (sequences)
    C  chunk (prefill chunk in inference, loss chunk in training)

The parallel degrees (tp, pp, cp, ep, micro-batches m) are known integers when a report is built, so
they enter the expressions as exact `Rational` coefficients (e.g. `24/t` with t = 8 becomes `3`). The
data-parallel degree may also be the symbol `dp`, to solve for the smallest GPU count of a plan.
Sliding windows make components piecewise in T: `Min(T, W)` keeps that exact.

Evaluation never goes through floats. `compile_exact` turns an expression into a Python function whose
arithmetic uses `int` and `fractions.Fraction` only (`Min` -> `min`, `ceiling` -> exact ceiling), and
`ceil_bytes` rounds a value up to whole bytes. This is what makes a 100-point sweep cost microseconds
instead of the milliseconds that `expr.subs` would.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import sympy

T = sympy.Symbol("T", integer=True, positive=True)
B = sympy.Symbol("B", integer=True, positive=True)
C = sympy.Symbol("C", integer=True, positive=True)
#: The data-parallel degree, kept symbolic when solving for the smallest GPU count under a plan.
DP = sympy.Symbol("dp", integer=True, positive=True)

#: The order of the arguments of every compiled function (dp defaults to 1).
ARGS = (T, B, C, DP)

ExactFn = Callable[..., "int | Fraction"]


def _ceil(x: int | Fraction) -> int:
    """Exact ceiling of an int or Fraction."""
    return -((-x) // 1)


def _floor(x: int | Fraction) -> int:
    return x // 1


def _ceil_sqrt(x: int | Fraction) -> int:
    """Exact ceiling of the square root of a non-negative int or Fraction: the least k with k*k >= x (for an
    integer k that is k*k >= ceil(x))."""
    n = _ceil(x)
    k = math.isqrt(n)
    return k if k * k >= n else k + 1


def ceil_bytes(x: int | Fraction) -> int:
    """Round a byte count up to an integer (a fractional byte is still a byte to allocate)."""
    return int(_ceil(x))


class Largest(sympy.Function):
    """max(a, b, ...) that stays unevaluated while an argument is symbolic, and is the number once all are.

    `sympy.Max` proves which argument is largest by comparing every pair symbolically (factoring their
    differences), seconds on a model of many kinds whose facets each take a max; the memory model never
    needs that proof, since it evaluates exactly at numbers (`compile_exact`). Nested maxima are flattened,
    repeated arguments dropped and the numeric ones folded into one.
    """

    @classmethod
    def eval(cls, *args):
        flat: list[sympy.Expr] = []
        for a in args:
            for x in (a.args if isinstance(a, Largest) else (a,)):
                if x not in flat:
                    flat.append(x)
        numbers = [x for x in flat if x.is_number]
        if len(numbers) == len(flat):
            return sympy.Max(*flat)
        keep = [x for x in flat if not x.is_number] + ([sympy.Max(*numbers)] if numbers else [])
        if len(keep) == 1:
            return keep[0]
        if tuple(keep) != tuple(args):
            return cls(*keep)
        return None


def to_python(expr: sympy.Expr) -> str:
    """Python source for `expr` using only int, Fraction, min, max and exact ceiling/floor.

    Raises TypeError on anything else (floats, functions we do not evaluate exactly), so a formula
    can never silently lose precision.
    """
    if expr.is_Integer:
        return str(int(expr))
    if expr.is_Rational:
        return f"_F({expr.p}, {expr.q})"
    if expr.is_Symbol:
        return expr.name
    if expr.is_Add:
        return "(" + " + ".join(to_python(a) for a in expr.args) + ")"
    if expr.is_Mul:
        return "(" + " * ".join(to_python(a) for a in expr.args) + ")"
    if expr.is_Pow:
        base, exp = expr.args
        if exp.is_Integer and exp > 0:
            return f"({to_python(base)} ** {int(exp)})"
        if exp.is_Integer and exp < 0:
            return f"(_F(1) / ({to_python(base)} ** {-int(exp)}))"
    if isinstance(expr, sympy.Min):
        return "min(" + ", ".join(to_python(a) for a in expr.args) + ")"
    if isinstance(expr, (sympy.Max, Largest)):
        return "max(" + ", ".join(to_python(a) for a in expr.args) + ")"
    if isinstance(expr, sympy.ceiling) and expr.args[0].is_Pow and expr.args[0].args[1] == sympy.Rational(1, 2):
        return f"_ceil_sqrt({to_python(expr.args[0].args[0])})"
    if isinstance(expr, sympy.ceiling):
        return f"_ceil({to_python(expr.args[0])})"
    if isinstance(expr, sympy.floor):
        return f"_floor({to_python(expr.args[0])})"
    raise TypeError(f"cannot evaluate {expr!r} exactly")


_NAMESPACE = {"_F": Fraction, "_ceil": _ceil, "_ceil_sqrt": _ceil_sqrt, "_floor": _floor, "min": min, "max": max}


def q(x) -> sympy.Expr:
    """An int or a symbol as a sympy value, so that dividing by it stays exact."""
    return sympy.sympify(x)


def per_replica(batch, replicas):
    """Sequences on the most loaded of `replicas` data-parallel ranks: ceil(B / replicas)."""
    return sympy.ceiling(batch / q(replicas))


def compile_exact(expr: sympy.Expr | int) -> ExactFn:
    """A function (T, B, C, dp=1) -> exact value of `expr` (an int or a Fraction)."""
    expr = sympy.sympify(expr)
    code = f"lambda T, B, C, dp=1: {to_python(expr)}"
    return eval(compile(code, "<ltmdsl.memory formula>", "eval"), dict(_NAMESPACE))  # noqa: S307


def compile_many(exprs: list[sympy.Expr]) -> Callable[[int, int, int], tuple]:
    """One function evaluating several expressions at once (one Python call per sweep point)."""
    body = ", ".join(to_python(sympy.sympify(e)) for e in exprs)
    code = f"lambda T, B, C, dp=1: ({body}{',' if len(exprs) == 1 else ''})"
    return eval(compile(code, "<ltmdsl.memory formulas>", "eval"), dict(_NAMESPACE))  # noqa: S307


def cdiv(a: int, b: int) -> int:
    """Integer ceiling division, for head counts split over tensor-parallel ranks."""
    return -(-a // b)


def formula_text(expr: sympy.Expr) -> str:
    """A compact human-readable formula: `min` and `ceil` spelled out, `*` kept for clarity."""
    text = sympy.sstr(sympy.sympify(expr), order="grlex")
    return (text.replace("Min(", "min(").replace("Max(", "max(").replace("Largest(", "max(")
            .replace("ceiling(", "ceil("))


def growth_order(fn: ExactFn, batch: int, chunk: int) -> str:
    """Asymptotic growth in T of a monotone component: 'O(1)', 'O(T)', 'O(T^2)' (or '0').

    Measured exactly on the integer formula far beyond any window or chunk: f(2T)/f(T) tends to
    2**degree for a polynomial in T, and `Min(T, W)` and `ceil(T/2048)` are linear or constant there.
    """
    t1, t2 = 2**50, 2**51
    a, b = fn(t1, batch, chunk), fn(t2, batch, chunk)
    if a == 0 and b == 0:
        return "0"
    if a == 0:
        return "O(T)"
    ratio = Fraction(b) / Fraction(a)
    if ratio < Fraction(3, 2):
        return "O(1)"
    if ratio < 3:
        return "O(T)"
    if ratio < 6:
        return "O(T^2)"
    return "O(T^k)"
