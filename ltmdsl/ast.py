"""The syntax tree of a spec file: what the user wrote, with positions, before any name is resolved.

The parser builds these nodes from Lark's tree; the resolver turns them into the IR; `fmt` prints them
back in canonical form. Expressions stay unevaluated here so that `fmt` can print `d_model / heads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ltmdsl.ir import SourcePos


@dataclass(frozen=True)
class Node:
    """Every node knows where it starts (`pos`) and on which line it ends (for comments in `fmt`)."""

    pos: SourcePos
    end_line: int


# ---- expressions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Num(Node):
    """A numeric literal as written (`128Ki`, `1e-5`, `80 GB`): `text` plus an optional byte unit."""

    text: str
    unit: str | None


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class Lit(Node):
    """`true`, `false` or `none`."""

    value: bool | None


@dataclass(frozen=True)
class KwArg(Node):
    name: str
    value: "Expr"


@dataclass(frozen=True)
class Call(Node):
    """`rmsnorm(eps = 1e-5)`, `cdiv(d_model, 16)`, `min(a, b)`."""

    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[KwArg, ...]


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # + - * / // % **
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class Neg(Node):
    operand: "Expr"


Expr = Union[Num, Name, Lit, Call, BinOp, Neg]


# ---- stack items ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref(Node):
    """A layer or block used in a stack, optionally with per-position overrides: `swa(window = 2Ki)`."""

    name: str
    kwargs: tuple[KwArg, ...] | None


@dataclass(frozen=True)
class Repeat(Node):
    count: Expr
    items: tuple["StackItem", ...]


@dataclass(frozen=True)
class Pattern(Node):
    """A Megatron-style pattern string; each non-space character is one sub-layer via the legend."""

    text: str  # without quotes


StackItem = Union[Ref, Repeat, Pattern]


# ---- definitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Use(Node):
    path: str


@dataclass(frozen=True)
class ConstDef(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class LayerDef(Node):
    """`layer attn = attention(heads = 32)`: a named sub-layer of a built-in kind."""

    name: str
    kind: str
    kind_pos: SourcePos
    kwargs: tuple[KwArg, ...]


@dataclass(frozen=True)
class BlockDef(Node):
    """A named sequence of stack items; `shared` blocks tie weights across every use."""

    name: str
    shared: bool
    items: tuple[StackItem, ...]


@dataclass(frozen=True)
class GpuDef(Node):
    name: str
    kwargs: tuple[KwArg, ...]


@dataclass(frozen=True)
class Assign(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class LegendEntry(Node):
    symbol: str
    target: str


@dataclass(frozen=True)
class Legend(Node):
    entries: tuple[LegendEntry, ...]


@dataclass(frozen=True)
class Stack(Node):
    items: tuple[StackItem, ...]


@dataclass(frozen=True)
class Override(Node):
    """`override 12 (window = 2Ki)`: change parameters of the sub-layer at one stack index."""

    index: Expr
    kwargs: tuple[KwArg, ...]


ModelStmt = Union[Assign, LayerDef, BlockDef, Legend, Stack, Override]


@dataclass(frozen=True)
class ModelDef(Node):
    name: str
    body: tuple[ModelStmt, ...]


@dataclass(frozen=True)
class ModeStmt(Node):
    mode: str  # inference | training
    kwargs: tuple[KwArg, ...]


@dataclass(frozen=True)
class OnStmt(Node):
    """`on 8 x H100 with tp = 8, zero = 1`."""

    count: Expr
    gpu: str
    gpu_pos: SourcePos
    kwargs: tuple[KwArg, ...]


@dataclass(frozen=True)
class Require(Node):
    component: str  # the limited quantity as written canonically: "kv_cache" or "kv_cache + recurrent_state"
    op: str  # <= | <
    limit: Expr
    parts: tuple[tuple[str, SourcePos], ...] = ()  # each summed name and where it is written


BudgetStmt = Union[ModeStmt, OnStmt, Require]


@dataclass(frozen=True)
class BudgetDef(Node):
    name: str
    model: str
    model_pos: SourcePos
    body: tuple[BudgetStmt, ...]


Item = Union[Use, ConstDef, LayerDef, BlockDef, GpuDef, ModelDef, BudgetDef]


@dataclass(frozen=True)
class Comment:
    line: int
    col: int
    text: str  # including the leading '#'


@dataclass(frozen=True)
class SpecFile:
    """One parsed file: its items in order and its comments (kept for `fmt`)."""

    path: str
    text: str
    items: tuple[Item, ...]
    comments: tuple[Comment, ...]
