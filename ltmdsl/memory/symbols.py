"""The symbols of the memory model and exact integer evaluation of its sympy expressions.

Every memory component is a sympy expression in three symbols:

    T  context (tokens per sequence)
    B  batch (sequences)
    C  chunk (prefill chunk in inference, loss chunk in training)

The parallel degrees (tp, pp, cp, ep, micro-batches m) are known integers when a report is built, so
they enter the expressions as exact `Rational` coefficients (e.g. `24/t` with t = 8 becomes `3`). The
data-parallel degree may also be the symbol `dp`, to solve for the smallest GPU count of a plan.
Sliding windows make components piecewise in T: `Smallest(T, W)` keeps that exact.

Evaluation never goes through floats. `compile_exact` turns an expression into a Python function whose
arithmetic is `int` only (each value a numerator over a denominator known when compiling; `Min` -> `min`,
`ceiling` -> an exact floor division), `compile_bytes` rounds each value up to whole bytes in the same
integers, and `ceil_bytes` rounds an exact value. The symbolic expression stays what `ltmdsl memory` shows
(`formula_text`); the compiled function is what the solver evaluates hundreds of times, tens of microseconds
each where `expr.subs` takes milliseconds.
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


def ceil_bytes(x: int | Fraction) -> int:
    """Round a byte count up to an integer (a fractional byte is still a byte to allocate)."""
    return int(-((-x) // 1))


class _Extremum(sympy.Function):
    """max or min of its arguments, unevaluated while an argument is symbolic and the number once all are.

    `sympy.Max` and `sympy.Min` prove which argument is extreme by comparing every pair symbolically
    (assumption queries and factored differences), most of the time `ltmdsl check` spends on a model of many
    kinds whose facets each take a max or a min; the memory model never needs that proof, since it
    evaluates exactly at numbers (`compile_exact`). Nested extrema of the same kind are flattened, repeated
    arguments dropped and the numeric ones folded into one.
    """

    _numeric: type  # sympy.Max or sympy.Min, for the numbers

    @classmethod
    def eval(cls, *args):
        flat: list[sympy.Expr] = []
        for a in args:
            for x in (a.args if isinstance(a, cls) else (a,)):
                if x not in flat:
                    flat.append(x)
        numbers = [x for x in flat if x.is_number]
        if len(numbers) == len(flat):
            return cls._numeric(*flat)
        keep = [x for x in flat if not x.is_number] + ([cls._numeric(*numbers)] if numbers else [])
        if len(keep) == 1:
            return keep[0]
        if tuple(keep) != tuple(args):
            return cls(*keep)
        return None


class Largest(_Extremum):
    """max(a, b, ...) without sympy's proof of which is largest (`_Extremum`)."""

    _numeric = sympy.Max


class Smallest(_Extremum):
    """min(a, b, ...) without sympy's proof of which is smallest (`_Extremum`): a window `Smallest(T, W)`
    stays exact and piecewise in T."""

    _numeric = sympy.Min


class _ScaledIntegers:
    """Straight-line Python that evaluates sympy expressions exactly in `int` arithmetic, no Fraction.

    Each distinct subexpression becomes one local variable holding an integer numerator n over a denominator
    D that is fixed when compiling: a constant (the lcm of the Rational coefficients below it) times, for a
    negative power such as 1/dp or 1/T, runtime variables holding positive integers. A value is n / D; sums,
    Min and max bring their terms to one D, ceiling and floor divide once with `//` (exact), and
    `fractions.Fraction` appears only in a result that is not a whole number. An int operation costs tens of
    nanoseconds where a Fraction operation (a gcd each) costs microseconds, and a repeated subexpression (the
    same layer term in several stages or under several maxima) is evaluated once.

    Raises TypeError on anything else (floats, functions not evaluated exactly), so a formula can never
    silently lose precision.
    """

    def __init__(self):
        self.lines: list[str] = []
        self._memo: dict = {}

    def _var(self, code: str) -> str:
        name = f"v{len(self.lines)}"
        self.lines.append(f"{name} = {code}")
        return name

    @staticmethod
    def den_code(const: int, runtime: tuple[str, ...]) -> str:
        """Python for the denominator const * runtime[0] * ..."""
        return " * ".join(([str(const)] if const != 1 or not runtime else []) + list(runtime))

    def _common(self, parts: list[tuple[str, int, tuple[str, ...]]]) -> tuple[list[str], int, tuple[str, ...]]:
        """The numerators of `parts` scaled to one denominator (lcm of the constants, union of the runtime
        factors), with that denominator."""
        const = math.lcm(*(c for _, c, _ in parts))
        runtime: list[str] = []
        for _, _, r in parts:
            have = list(runtime)
            for name in r:
                if name in have:
                    have.remove(name)
                else:
                    runtime.append(name)
        runtime.sort()
        scaled = []
        for n, c, r in parts:
            missing = list(runtime)
            for name in r:
                missing.remove(name)
            factor = self.den_code(const // c, tuple(missing))
            scaled.append(n if factor == "1" else f"{n} * {factor}")
        return scaled, const, tuple(runtime)

    def node(self, e: sympy.Expr) -> tuple[str, int, tuple[str, ...]]:
        """(numerator: a literal, argument or local variable, constant denominator, runtime denominators)."""
        hit = self._memo.get(e)
        if hit is None:
            hit = self._memo[e] = self._build(e)
        return hit

    def _build(self, e: sympy.Expr) -> tuple[str, int, tuple[str, ...]]:
        if e.is_Integer:
            return str(int(e)), 1, ()
        if e.is_Rational:
            return str(e.p), e.q, ()
        if e.is_Symbol:
            return e.name, 1, ()
        if e.is_Add or isinstance(e, (sympy.Min, sympy.Max, _Extremum)):
            if len(e.args) == 1:  # an unevaluated Largest(x) or Add(x) is x
                return self.node(e.args[0])
            scaled, const, runtime = self._common([self.node(a) for a in e.args])
            if e.is_Add:
                return self._var(" + ".join(scaled)), const, runtime
            fn = "min" if isinstance(e, (sympy.Min, Smallest)) else "max"
            return self._var(f"{fn}({', '.join(scaled)})"), const, runtime
        if e.is_Mul:
            parts = [self.node(a) for a in e.args]
            return (self._var(" * ".join(n for n, _, _ in parts)), math.prod(c for _, c, _ in parts),
                    tuple(sorted(name for _, _, r in parts for name in r)))
        if e.is_Pow and e.args[1].is_Integer:
            (n, c, r), k = self.node(e.args[0]), int(e.args[1])
            if k > 0:
                return self._var(f"{n} ** {k}"), c ** k, tuple(sorted(r * k))
            if k < 0 and e.args[0].is_Rational:  # a number's reciprocal (an unevaluated 1/8): a constant
                inverse = Fraction(int(e.args[0].p), int(e.args[0].q)) ** k
                return str(inverse.numerator), inverse.denominator, ()
            if k < 0:  # (n / D) ** -k = D**k / n**k, with the sign carried by the numerator
                power = self._var(f"{n} ** {-k}")
                den = self._var(f"abs({power})")
                top = self.den_code(c ** -k, tuple(x for x in r for _ in range(-k)))
                return self._var(f"({top}) if {power} > 0 else -({top})"), 1, (den,)
        if isinstance(e, sympy.ceiling) and e.args[0].is_Pow and e.args[0].args[1] == sympy.Rational(1, 2):
            n, c, r = self.node(e.args[0].args[0])
            return self._var(f"_ceil_sqrt(-(-{n} // ({self.den_code(c, r)})))"), 1, ()
        if isinstance(e, (sympy.ceiling, sympy.floor)):
            n, c, r = self.node(e.args[0])
            if c == 1 and not r:
                return n, 1, ()
            division = f"{n} // ({self.den_code(c, r)})"
            return self._var(f"-(-{division})" if isinstance(e, sympy.ceiling) else division), 1, ()
        raise TypeError(f"cannot evaluate {e!r} exactly")


def _ceil_sqrt(n: int) -> int:
    """The least k with k*k >= n, for an integer n >= 0 (the ceiling of its square root)."""
    k = math.isqrt(n)
    return k if k * k >= n else k + 1


def _exact(n: int, d: int) -> int | Fraction:
    """n / d as an int when it is whole, else a Fraction."""
    return n // d if n % d == 0 else Fraction(n, d)


def _compile(exprs: list, rounded: bool, name: str) -> Callable[..., tuple]:
    """One function (T, B, C, dp=1) -> a tuple of the values of `exprs`: exact (int or Fraction), or each
    rounded up to an integer (`rounded`)."""
    emit = _ScaledIntegers()
    results = []
    for e in exprs:
        n, c, r = emit.node(sympy.sympify(e))
        d = emit.den_code(c, r)
        results.append(n if d == "1" else f"-(-{n} // ({d}))" if rounded else f"_exact({n}, {d})")
    body = "".join(f"    {line}\n" for line in emit.lines)
    code = f"def formulas(T, B, C, dp=1):\n{body}    return ({', '.join(results)}{',' if len(results) == 1 else ''})\n"
    namespace = {"_ceil_sqrt": _ceil_sqrt, "_exact": _exact, "min": min, "max": max, "abs": abs}
    exec(compile(code, name, "exec"), namespace)  # noqa: S102
    return namespace["formulas"]


def q(x) -> sympy.Expr:
    """An int or a symbol as a sympy value, so that dividing by it stays exact."""
    return sympy.sympify(x)


def per_replica(batch, replicas):
    """Sequences on the most loaded of `replicas` data-parallel ranks: ceil(B / replicas)."""
    return sympy.ceiling(batch / q(replicas))


def compile_exact(expr: sympy.Expr | int) -> ExactFn:
    """A function (T, B, C, dp=1) -> exact value of `expr` (an int or a Fraction)."""
    fn = _compile([expr], rounded=False, name="<ltmdsl.memory formula>")
    return lambda T, B, C, dp=1: fn(T, B, C, dp)[0]


def compile_many(exprs: list[sympy.Expr]) -> Callable[..., tuple]:
    """One function evaluating several expressions at once, exactly (one Python call per sweep point)."""
    return _compile(exprs, rounded=False, name="<ltmdsl.memory formulas>")


def compile_bytes(exprs: list[sympy.Expr]) -> Callable[..., tuple[int, ...]]:
    """One function (T, B, C, dp=1) -> each of `exprs` rounded up to whole bytes (`ceil_bytes` of its exact
    value, computed in integers: what the evaluator and the solver call hundreds of times)."""
    return _compile(exprs, rounded=True, name="<ltmdsl.memory byte formulas>")


def cdiv(a: int, b: int) -> int:
    """Integer ceiling division, for head counts split over tensor-parallel ranks."""
    return -(-a // b)


def formula_text(expr: sympy.Expr) -> str:
    """A compact human-readable formula: `min` and `ceil` spelled out, `*` kept for clarity."""
    text = sympy.sstr(sympy.sympify(expr), order="grlex")
    for name, shown in (("Min(", "min("), ("Max(", "max("), ("Largest(", "max("), ("Smallest(", "min("),
                        ("ceiling(", "ceil(")):
        text = text.replace(name, shown)
    return text


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
