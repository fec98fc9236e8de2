"""Evaluating spec expressions exactly: integers stay integers, division must be exact, sizes are bounded.

Values are Python ints, floats, bools, None, `Word` (a bare identifier that is not a constant, such as
`swiglu` or `bf16`, whose meaning the parameter decides), `NormValue` (`rmsnorm(eps = 1e-5)`) and
`RopeScaling` (`llama3(factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_context = 8192)`,
`linear(factor = 8)`, `dynamic(...)`, `yarn(factor = 40, original_context = 4096, ...)`, `longrope(...)` with its
`factors(...)` lists (tuples of floats), checked here so that a constant holding one is already valid).
Problems are reported through an `EvalError` carrying the position to point at.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

from ltmdsl import ast
from ltmdsl.ir import RopeScaling, SourcePos
from ltmdsl.units import BYTE_UNITS, COUNT_SUFFIXES

MAX_MAGNITUDE = 2**100  # larger than any byte count a model could need, small enough to stay fast


class EvalError(Exception):
    """An expression could not be evaluated; `pos` is where to point."""

    def __init__(self, pos: SourcePos, message: str):
        super().__init__(message)
        self.pos = pos
        self.message = message


@dataclass(frozen=True)
class Word:
    """A bare identifier with no constant behind it: an enum value like `swiglu`, or a typo."""

    name: str
    pos: SourcePos


@dataclass(frozen=True)
class NormValue:
    kind: str
    eps: float
    zero_centred: bool = False


@dataclass(frozen=True)
class MTPValue:
    """`mtp(depth = 1, mixer = attn, ffn = moe)`: DeepSeek-V3's multi-token-prediction modules, whose block is
    the named layer definitions (checked by the model that uses it)."""

    depth: int
    mixer: Word
    ffn: Word
    pos: SourcePos


def did_you_mean(name: str, candidates) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _exact_number(node: ast.Num) -> tuple[Fraction, bool]:
    """(exact value, written as a real) of a literal: `1e23` is exactly 10**23 here, whatever float says."""
    text = node.text.replace("_", "")
    suffix = ""
    for s in sorted(COUNT_SUFFIXES, key=len, reverse=True):
        if text.endswith(s):
            suffix, text = s, text[: -len(s)]
            break
    scale = COUNT_SUFFIXES.get(suffix, 1) * (BYTE_UNITS[node.unit] if node.unit else 1)
    is_real = "." in text or "e" in text.lower()
    try:
        exact = Fraction(text) * scale
    except (ValueError, ZeroDivisionError):
        raise EvalError(node.pos, f"malformed number '{node.text}'") from None
    if abs(exact) > MAX_MAGNITUDE:
        raise EvalError(node.pos, f"number '{node.text}' is too large")
    return exact, is_real and scale == 1


def parse_number(node: ast.Num) -> int | float:
    """The value of a literal: suffixes and byte units give exact integers; `1e-5` and `0.5` give floats."""
    exact, real = _exact_number(node)
    if real:
        return float(exact)
    if exact.denominator != 1:
        raise EvalError(node.pos, f"'{node.text}{node.unit or ''}' is not a whole number")
    return int(exact)


_COUNT_RE = re.compile(r"[0-9][0-9_]*(\.[0-9]+)?([eE][+-]?[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?")


def parse_count(text: str) -> int:
    """A positive whole count written as in a spec (`4096`, `100M`, `128Ki`, `1_000`, `1e6`); ValueError.

    Command-line options such as `--context` and `--tokens` use it, so they read numbers as specs do. The
    value is exact: `1e23` is 10**23, never the float nearest to it, and `1.5` or `1e-3` is refused.
    """
    cleaned = text.strip()
    if len(cleaned) > 40 or not _COUNT_RE.fullmatch(cleaned):
        hint = ""
        m = re.fullmatch(r"([0-9][0-9_.eE+-]*?)([A-Za-z]+)", cleaned)
        if m and _COUNT_RE.fullmatch(m.group(1)):
            fixed = next((s for s in COUNT_SUFFIXES if s.lower() == m.group(2).lower()), None)
            hint = f"; did you mean {m.group(1)}{fixed}? (suffixes are case-sensitive)" if fixed else ""
        raise ValueError(f"not a count: {text!r} (an integer with an optional K/M/G/T/Ki/Mi/Gi/Ti suffix){hint}")
    pos = SourcePos("<argument>", 1, 1)
    try:
        exact, _ = _exact_number(ast.Num(pos, 1, cleaned, None))
    except EvalError as e:
        raise ValueError(f"{text!r}: {e.message}") from None
    if exact.denominator != 1:
        raise ValueError(f"not a whole count: {text!r}")
    if exact < 1:
        raise ValueError(f"must be at least 1: {text!r}")
    return int(exact)


def _check_size(value: Any, pos: SourcePos) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_MAGNITUDE:
        raise EvalError(pos, "value is too large")
    return value


def _numeric(value: Any, pos: SourcePos, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Word):
            raise EvalError(value.pos, f"unknown name '{value.name}'")
        raise EvalError(pos, f"{what} needs numbers, got {describe(value)}")
    return value


def describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "none"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value:g}"
    if isinstance(value, Word):
        return f"'{value.name}'"
    if isinstance(value, NormValue):
        return f"a {value.kind}"
    if isinstance(value, RopeScaling):
        return f"a {value.kind}() rope scaling"
    if isinstance(value, tuple):
        return f"a list of {len(value)} factors"
    return type(value).__name__


def _binop(op: str, a: Any, b: Any, pos: SourcePos) -> Any:
    a = _numeric(a, pos, f"'{op}'")
    b = _numeric(b, pos, f"'{op}'")
    both_int = isinstance(a, int) and isinstance(b, int)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op in ("/", "//", "%") and b == 0:
        raise EvalError(pos, "division by zero")
    if op == "/":
        if both_int:
            if a % b:
                raise EvalError(pos, f"{a} / {b} is not an integer (use // to round down or cdiv() to round up)")
            return a // b
        return a / b
    if op == "//":
        return a // b if both_int else float(a // b)
    if op == "%":
        return a % b
    if op == "**":
        return _power(a, b, pos)
    raise EvalError(pos, f"unknown operator {op}")  # pragma: no cover - the grammar has no other


def _power(a: int | float, b: int | float, pos: SourcePos) -> int | float:
    """`a ** b` without ever raising anything but EvalError: exact for integers, bounded for floats.

    Python's own `**` raises OverflowError (`0.5 ** -10000`), ZeroDivisionError (`0.0 ** -1`), returns a
    complex number (`(-8) ** 0.5`) or builds a huge integer first; each case is refused here before it can.
    """
    if isinstance(a, int) and isinstance(b, int):
        if b < 0:
            raise EvalError(pos, f"{a} ** {b}: a negative integer exponent is not a whole number "
                            "(write the base as a float, such as 2.0, for a fraction)")
        # |a| >= 2**(bit_length - 1): past this the result is surely too large; below it, it is cheap to compute
        if abs(a) > 1 and b * (abs(a).bit_length() - 1) > MAX_MAGNITUDE.bit_length():
            raise EvalError(pos, "value is too large")
        return _check_size(a**b, pos)
    x, y = float(a), float(b)
    if x == 0 and y < 0:
        raise EvalError(pos, "division by zero (zero to a negative power)")
    if x < 0 and not y.is_integer():
        raise EvalError(pos, f"({a:g}) ** {b:g} is not a real number (a negative base needs a whole exponent)")
    if x != 0 and abs(x) != 1:
        # log2 of the result's magnitude; refuse before computing what cannot be represented
        if y * math.log2(abs(x)) > MAX_MAGNITUDE.bit_length():
            raise EvalError(pos, "value is too large")
    try:
        return x**y
    except (OverflowError, ZeroDivisionError, ValueError):  # pragma: no cover - excluded by the checks above
        raise EvalError(pos, f"{a:g} ** {b:g} cannot be computed") from None


class Scope:
    """Names visible to an expression: a dict of lazily evaluated constants chained to a parent scope."""

    def __init__(self, exprs: dict[str, ast.Expr], parent: "Scope | None" = None,
                 fixed: dict[str, Any] | None = None):
        self.exprs = exprs
        self.parent = parent
        self.values: dict[str, Any] = dict(fixed or {})
        self._active: set[str] = set()
        self.used: set[str] = set()

    def names(self) -> set[str]:
        own = set(self.exprs) | set(self.values)
        return own | (self.parent.names() if self.parent else set())

    def lookup(self, name: str, pos: SourcePos) -> Any:
        if name in self.values:
            self.used.add(name)
            return self.values[name]
        if name in self.exprs:
            self.used.add(name)
            if name in self._active:
                raise EvalError(pos, f"constant '{name}' is defined in terms of itself")
            self._active.add(name)
            try:
                value = evaluate(self.exprs[name], self)
            finally:
                self._active.discard(name)
            self.values[name] = value
            return value
        if self.parent is not None:
            return self.parent.lookup(name, pos)
        return Word(name, pos)


#: The RoPE scalings a spec can call, each with its required and optional keyword parameters (see `RopeScaling`).
ROPE_SCALINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_context"), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor", "original_context"), ()),
    "longrope": (("factor", "original_context", "short_factor", "long_factor"), ("attention_factor",)),
    "yarn": (("factor", "original_context"),
             ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")),
}
#: The keyword parameters of `llama3(...)`, all required, in the order they are documented.
LLAMA3_PARAMS = ROPE_SCALINGS["llama3"][0]


def rope_scaling_usage(name: str) -> str:
    """`yarn(factor = ..., original_context = ..., [beta_fast = ...], ...)`: the call with its keywords."""
    required, optional = ROPE_SCALINGS[name]
    return f"{name}({', '.join([f'{n} = ...' for n in required] + [f'[{n} = ...]' for n in optional])})"


def _rope_scaling(node: ast.Call, scope: Scope) -> RopeScaling:
    """`llama3(...)`, `linear(factor = 8)`, `dynamic(factor = 2, original_context = 4096)` or `yarn(...)`.

    The RoPE frequency scalings of `RopeScaling`. Keywords only; the required ones must all be given and each is
    checked, errors pointing at the offending keyword or value: factor >= 1 (1 leaves every frequency unchanged);
    llama3: 0 < low_freq_factor <= high_freq_factor (the wavelength thresholds original_context / low_freq_factor
    and original_context / high_freq_factor must be ordered; equal, as Llama-4's, there is no band to interpolate
    and the scaling is a step, as transformers computes it); yarn:
    beta_fast > beta_slow > 0 (the extrapolated band must lie above the interpolated one), mscale and
    mscale_all_dim > 0, attention_factor > 0, truncate true or false; original_context a whole number >= 1.
    """
    name = node.func
    required, optional = ROPE_SCALINGS[name]
    known = required + optional
    usage = rope_scaling_usage(name)
    if node.args:
        raise EvalError(node.args[0].pos, f"{name}() takes keyword arguments only: {usage}")
    given: dict[str, tuple[Any, SourcePos]] = {}
    for k in node.kwargs:
        if k.name not in known:
            raise EvalError(k.pos, f"unknown parameter '{k.name}' of {name}(){did_you_mean(k.name, known)}"
                            f" (parameters: {', '.join(known)})")
        if k.name in given:
            raise EvalError(k.pos, f"parameter '{k.name}' of {name}() given twice")
        given[k.name] = (evaluate(k.value, scope), k.value.pos)
    missing = [n for n in required if n not in given]
    if missing:
        needs = "all four" if name == "llama3" else ", ".join(required)
        raise EvalError(node.pos, f"{name}() is missing {', '.join(missing)} (it needs {needs}: {usage})")

    def number(key: str, low: float = 0.0, strict: bool = True) -> float | None:
        if key not in given:
            return None
        value, pos = given[key]
        if isinstance(value, Word):
            raise EvalError(value.pos, f"unknown name '{value.name}'{did_you_mean(value.name, scope.names())}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvalError(pos, f"{name}() {key} must be a number, got {describe(value)}")
        if (value <= low) if strict else (value < low):
            raise EvalError(pos, f"{name}() {key} must be {'positive' if low == 0 else f'at least {low:g}'}, "
                            f"got {value:g}")
        return float(value)

    factor = number("factor", 1.0, strict=False)
    context = None
    if "original_context" in given:
        context = as_int(given["original_context"][0], given["original_context"][1], f"{name}() original_context", 1)
    if name == "linear":
        return RopeScaling("linear", factor)
    if name == "dynamic":
        return RopeScaling("dynamic", factor, original_context=context)
    if name == "longrope":
        lists = {}
        for key in ("short_factor", "long_factor"):
            value, pos = given[key]
            if not isinstance(value, tuple):
                raise EvalError(pos, f"longrope() {key} must be factors(...), one positive number per rotated "
                                f"channel pair, got {describe(value)}")
            lists[key] = value
        if len(lists["short_factor"]) != len(lists["long_factor"]):
            raise EvalError(given["long_factor"][1], f"longrope() long_factor has {len(lists['long_factor'])} "
                            f"factors but short_factor has {len(lists['short_factor'])}; both need one per rotated "
                            "channel pair")
        return RopeScaling("longrope", factor, original_context=context, attention_factor=number("attention_factor"),
                           short_factor=lists["short_factor"], long_factor=lists["long_factor"])
    if name == "llama3":
        low, high = number("low_freq_factor"), number("high_freq_factor", -math.inf)
        if high < low:
            raise EvalError(given["high_freq_factor"][1], f"llama3() high_freq_factor ({high:g}) must be at least "
                            f"low_freq_factor ({low:g})")
        return RopeScaling("llama3", factor, low, high, context)
    fast, slow = number("beta_fast"), number("beta_slow")
    if (fast if fast is not None else 32.0) <= (slow if slow is not None else 1.0):
        key = "beta_fast" if fast is not None else "beta_slow"
        raise EvalError(given[key][1], f"yarn() beta_fast ({fast if fast is not None else 32:g}) must be greater "
                        f"than beta_slow ({slow if slow is not None else 1:g})")
    truncate = None
    if "truncate" in given:
        truncate, tpos = given["truncate"]
        if not isinstance(truncate, bool):
            raise EvalError(tpos, f"yarn() truncate must be true or false, got {describe(truncate)}")
    return RopeScaling("yarn", factor, original_context=context, beta_fast=fast, beta_slow=slow,
                       mscale=number("mscale"), mscale_all_dim=number("mscale_all_dim"),
                       attention_factor=number("attention_factor"), truncate=truncate)


def _factors(node: ast.Call, scope: Scope) -> tuple[float, ...]:
    """`factors(1, 1.05, 1.2)`: LongRoPE's per-frequency rescale factors, positive numbers, at least one."""
    if node.kwargs:
        raise EvalError(node.kwargs[0].pos, "factors() takes numbers only: factors(1.0, 1.05, ...)")
    if not node.args:
        raise EvalError(node.pos, "factors() needs at least one number")
    out = []
    for a in node.args:
        value = evaluate(a, scope)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise EvalError(a.pos, f"factors() takes positive numbers, got {describe(value)}")
        out.append(float(value))
    return tuple(out)


MTP_PARAMS = ("depth", "mixer", "ffn")


def _mtp(node: ast.Call, args: list, kwargs: dict) -> MTPValue:
    """`mtp(depth = N, mixer = NAME, ffn = NAME)`: depth (default 1) a whole number >= 1, mixer and ffn the
    names of layer definitions (bare names: the model resolves them)."""
    if args:
        raise EvalError(node.pos, "mtp() takes only depth = ..., mixer = ..., ffn = ...")
    for k, (_, kpos) in kwargs.items():
        if k not in MTP_PARAMS:
            raise EvalError(kpos, f"unknown parameter '{k}' of mtp(){did_you_mean(k, MTP_PARAMS)} "
                            f"(parameters: {', '.join(MTP_PARAMS)})")
    for k in ("mixer", "ffn"):
        if k not in kwargs:
            raise EvalError(node.pos, f"mtp() needs {k} = the name of a layer definition")
        value, kpos = kwargs[k]
        if not isinstance(value, Word):
            raise EvalError(kpos, f"mtp() {k} must name a layer definition, got {describe(value)}")
    depth, dpos = kwargs.get("depth", (1, node.pos))
    depth = as_int(depth, dpos, "mtp() depth", 1)
    if depth > 64:
        raise EvalError(dpos, f"mtp() depth must be at most 64, got {depth}")
    return MTPValue(depth, kwargs["mixer"][0], kwargs["ffn"][0], node.pos)


def _call(node: ast.Call, scope: Scope) -> Any:
    if node.func in ROPE_SCALINGS:
        return _rope_scaling(node, scope)
    if node.func == "factors":
        return _factors(node, scope)
    args = [evaluate(a, scope) for a in node.args]
    kwargs = {k.name: (evaluate(k.value, scope), k.pos) for k in node.kwargs}
    if node.func == "mtp":
        return _mtp(node, args, kwargs)
    if node.func in ("rmsnorm", "layernorm"):
        allowed = ["eps", "zero_centred"] if node.func == "rmsnorm" else ["eps"]
        if args:
            raise EvalError(node.pos, f"{node.func}() takes only {' = ..., '.join(allowed)} = ...")
        for k, (_, kpos) in kwargs.items():
            if k not in allowed:
                extra = " (zero_centred is an rmsnorm setting)" if k == "zero_centred" else ""
                raise EvalError(kpos, f"unknown parameter '{k}' of {node.func}(){did_you_mean(k, allowed)}{extra}")
        eps = kwargs.get("eps", (1e-5, node.pos))[0]
        eps = _numeric(eps, node.pos, "eps")
        if not 0 < eps < 1:
            raise EvalError(node.pos, f"eps must be between 0 and 1, got {eps:g}")
        centred, cpos = kwargs.get("zero_centred", (False, node.pos))
        if not isinstance(centred, bool):
            raise EvalError(cpos, f"zero_centred must be true or false, got {describe(centred)}")
        return NormValue(node.func, float(eps), centred)
    fns: dict[str, tuple[int, Callable]] = {
        "cdiv": (2, lambda a, b: -(-a // b)),
        "min": (-1, min),
        "max": (-1, max),
    }
    if node.func not in fns:
        raise EvalError(node.pos, f"unknown function '{node.func}'"
                        f"{did_you_mean(node.func, [*fns, 'rmsnorm', 'layernorm', 'factors', 'mtp', *ROPE_SCALINGS])}")
    arity, fn = fns[node.func]
    if kwargs:
        raise EvalError(node.pos, f"{node.func}() takes positional arguments only")
    if (arity >= 0 and len(args) != arity) or (arity < 0 and not args):
        raise EvalError(node.pos, f"{node.func}() takes {arity if arity >= 0 else 'one or more'} arguments")
    nums = [_numeric(a, node.pos, f"{node.func}()") for a in args]
    if node.func == "cdiv":
        if not all(isinstance(n, int) for n in nums):
            raise EvalError(node.pos, "cdiv() needs integers")
        if nums[1] == 0:
            raise EvalError(node.pos, "division by zero")
    return fn(*nums)


def evaluate(node: ast.Expr, scope: Scope) -> Any:
    """The value of an expression in a scope; raises EvalError with a position."""
    if isinstance(node, ast.Num):
        return parse_number(node)
    if isinstance(node, ast.Lit):
        return node.value
    if isinstance(node, ast.Name):
        return scope.lookup(node.id, node.pos)
    if isinstance(node, ast.Neg):
        return -_numeric(evaluate(node.operand, scope), node.pos, "'-'")
    if isinstance(node, ast.BinOp):
        return _check_size(_binop(node.op, evaluate(node.left, scope), evaluate(node.right, scope), node.pos), node.pos)
    if isinstance(node, ast.Call):
        return _call(node, scope)
    raise EvalError(node.pos, f"cannot evaluate {type(node).__name__}")  # pragma: no cover


def as_int(value: Any, pos: SourcePos, what: str, minimum: int | None = None) -> int:
    """An integer parameter: ints, or floats with an exact integer value (`1e6`)."""
    if isinstance(value, Word):
        raise EvalError(value.pos, f"unknown name '{value.name}' for {what}")
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvalError(pos, f"{what} must be an integer, got {describe(value)}")
    if minimum is not None and value < minimum:
        raise EvalError(pos, f"{what} must be at least {minimum}, got {value}")
    return value
