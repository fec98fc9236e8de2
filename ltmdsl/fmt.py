"""Canonical printing of a spec: four-space indents, one statement a line, minimal parentheses.

Comments are kept: a comment before a statement stays before it, a comment at the end of a line stays
at the end of that statement's line. Parsing the output gives the same IR (a tested property).
"""

from __future__ import annotations

import re

from ltmdsl import ast

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2, "**": 4}
_INLINE_WIDTH = 88


def expr(node: ast.Expr, parent_prec: int = 0, right: bool = False) -> str:
    """An expression with only the parentheses its meaning needs."""
    if isinstance(node, ast.Num):
        if node.unit is None:
            return node.text
        glued = node.text[-1].isalpha()  # `80GB` was written as `80G` + `B`
        return f"{node.text}{node.unit}" if glued else f"{node.text} {node.unit}"
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Lit):
        return {True: "true", False: "false", None: "none"}[node.value]
    if isinstance(node, ast.Call):
        parts = [expr(a) for a in node.args] + [f"{k.name} = {expr(k.value)}" for k in node.kwargs]
        return f"{node.func}({', '.join(parts)})"
    if isinstance(node, ast.Neg):
        inner = expr(node.operand, 3)
        # `- -x`, not `--x`: a run of operators is refused by the parser's guard past a length
        text = f"- {inner}" if inner.startswith("-") else f"-{inner}"
        return f"({text})" if parent_prec > 3 else text
    if isinstance(node, ast.BinOp):
        p = _PREC[node.op]
        if node.op == "**":  # right-associative, binds tighter than unary minus on its left
            text = f"{expr(node.left, 5)} ** {expr(node.right, 3)}"
        else:
            text = f"{expr(node.left, p)} {node.op} {expr(node.right, p, right=True)}"
        needs = parent_prec > p or (right and parent_prec == p)
        return f"({text})" if needs else text
    raise TypeError(type(node).__name__)  # pragma: no cover


def kwargs(items) -> str:
    return ", ".join(f"{k.name} = {expr(k.value)}" for k in items)


class _Printer:
    def __init__(self, comments: tuple[ast.Comment, ...]):
        self.lines: list[str] = []
        self.comments = sorted(comments, key=lambda c: (c.line, c.col))
        self.next = 0

    def _before(self, line: int, indent: int) -> None:
        while self.next < len(self.comments) and self.comments[self.next].line < line:
            self.lines.append("    " * indent + self.comments[self.next].text)
            self.next += 1

    def emit(self, text: str, node: ast.Node | None, indent: int, end_line: int | None = None) -> None:
        """One output line for `node`: leading comments first, a trailing comment on its last line after."""
        if node is not None:
            self._before(node.pos.line, indent)
        out = "    " * indent + text
        last = end_line if end_line is not None else (node.end_line if node is not None else None)
        if last is not None:
            while self.next < len(self.comments) and self.comments[self.next].line == last:
                out += "  " + self.comments[self.next].text
                self.next += 1
        self.lines.append(out)

    def rest(self, indent: int = 0) -> None:
        self._before(10**12, indent)

    def close(self, indent: int, end_line: int, text: str = "}") -> None:
        """The closing line of a block: comments written before it stay inside the block, one level in."""
        self._before(end_line, indent + 1)
        self.emit(text, None, indent, end_line=end_line)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")


def _is_simple(item) -> bool:
    return isinstance(item, (ast.Ref, ast.Pattern))


def _simple(item) -> str:
    if isinstance(item, ast.Pattern):
        return f'pattern "{item.text}"'
    if item.kwargs is None:
        return item.name
    return f"{item.name}({kwargs(item.kwargs)})"


def _inline(items) -> str | None:
    """`a b repeat 2 { c d }` on one line when everything is simple and short."""
    parts = []
    for it in items:
        if _is_simple(it):
            parts.append(_simple(it))
        elif isinstance(it, ast.Repeat):
            inner = _inline(it.items)
            if inner is None:
                return None
            parts.append(f"repeat {expr(it.count)} {{ {inner} }}")
        else:  # pragma: no cover
            return None
    text = " ".join(parts)
    return text if len(text) <= _INLINE_WIDTH else None


def _items(p: _Printer, items, indent: int) -> None:
    """Stack items: simple items that shared a source line share an output line."""
    i = 0
    while i < len(items):
        it = items[i]
        if isinstance(it, ast.Repeat):
            inner = _inline(it.items)
            if inner is not None and it.pos.line == it.end_line:
                p.emit(f"repeat {expr(it.count)} {{ {inner} }}", it, indent)
            else:
                p.emit(f"repeat {expr(it.count)} {{", it, indent, end_line=it.pos.line)
                _items(p, it.items, indent + 1)
                p.close(indent, it.end_line)
            i += 1
            continue
        group = [it]
        while i + len(group) < len(items):
            nxt = items[i + len(group)]
            if not _is_simple(nxt) or nxt.pos.line != it.pos.line:
                break
            group.append(nxt)
        p.emit(" ".join(_simple(g) for g in group), it, indent, end_line=group[-1].end_line)
        i += len(group)


def _block(p: _Printer, node: ast.BlockDef, indent: int) -> None:
    head = f"{'shared ' if node.shared else ''}block {node.name}"
    inner = _inline(node.items)
    if inner is not None and node.pos.line == node.end_line:
        p.emit(f"{head} {{ {inner} }}", node, indent)
    else:
        p.emit(f"{head} {{", node, indent, end_line=node.pos.line)
        _items(p, node.items, indent + 1)
        p.close(indent, node.end_line)


_MAX_LINE = 100


def _layer(p: _Printer, node: ast.LayerDef, indent: int) -> None:
    """One line when it fits in _MAX_LINE columns, else one keyword argument per line."""
    one = f"layer {node.name} = {node.kind}({kwargs(node.kwargs)})"
    if len("    " * indent + one) <= _MAX_LINE or not node.kwargs:
        p.emit(one, node, indent)
        return
    p.emit(f"layer {node.name} = {node.kind}(", node, indent, end_line=node.pos.line)
    for kw in node.kwargs:
        p.emit(f"{kw.name} = {expr(kw.value)},", kw, indent + 1)
    p.close(indent, node.end_line, ")")


_BARE_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _symbol(symbol: str) -> str:
    """A legend symbol as the grammar reads it: bare only when it lexes as a NAME (ASCII), else quoted."""
    return symbol if _BARE_SYMBOL.fullmatch(symbol) else f'"{symbol}"'


def _model(p: _Printer, node: ast.ModelDef) -> None:
    p.emit(f"model {node.name} {{", node, 0, end_line=node.pos.line)
    prev = None
    for stmt in node.body:
        kind = type(stmt)
        if prev is not None and (kind is not prev or kind in (ast.Stack, ast.BlockDef)):
            p.blank()
        prev = kind
        if isinstance(stmt, ast.Assign):
            p.emit(f"{stmt.name} = {expr(stmt.value)}", stmt, 1)
        elif isinstance(stmt, ast.LayerDef):
            _layer(p, stmt, 1)
        elif isinstance(stmt, ast.BlockDef):
            _block(p, stmt, 1)
        elif isinstance(stmt, ast.Legend):
            entries = ", ".join(f"{_symbol(e.symbol)} = {e.target}" for e in stmt.entries)
            p.emit(f"legend {{ {entries} }}", stmt, 1)
        elif isinstance(stmt, ast.Stack):
            p.emit("stack {", stmt, 1, end_line=stmt.pos.line)
            _items(p, stmt.items, 2)
            p.close(1, stmt.end_line)
        elif isinstance(stmt, ast.Override):
            p.emit(f"override {expr(stmt.index)} ({kwargs(stmt.kwargs)})", stmt, 1)
    p.close(0, node.end_line)


def _budget(p: _Printer, node: ast.BudgetDef) -> None:
    p.emit(f"budget {node.name} for {node.model} {{", node, 0, end_line=node.pos.line)
    for stmt in node.body:
        if isinstance(stmt, ast.ModeStmt):
            p.emit(f"{stmt.mode} {kwargs(stmt.kwargs)}".rstrip(), stmt, 1)
        elif isinstance(stmt, ast.OnStmt):
            text = f"on {expr(stmt.count)} x {stmt.gpu}"
            if stmt.kwargs:
                text += f" with {kwargs(stmt.kwargs)}"
            p.emit(text, stmt, 1)
        elif isinstance(stmt, ast.Require):
            p.emit(f"require {stmt.component} {stmt.op} {expr(stmt.limit)}", stmt, 1)
    p.close(0, node.end_line)


def format_spec(spec: ast.SpecFile) -> str:
    """The canonical text of a parsed spec file."""
    p = _Printer(spec.comments)
    prev = None
    for item in spec.items:
        kind = type(item)
        if prev is not None and (kind is not prev or kind in (ast.ModelDef, ast.BudgetDef, ast.BlockDef, ast.GpuDef)):
            p.blank()
        prev = kind
        if isinstance(item, ast.Use):
            p.emit(f'use "{item.path}"', item, 0)
        elif isinstance(item, ast.ConstDef):
            p.emit(f"const {item.name} = {expr(item.value)}", item, 0)
        elif isinstance(item, ast.LayerDef):
            _layer(p, item, 0)
        elif isinstance(item, ast.BlockDef):
            _block(p, item, 0)
        elif isinstance(item, ast.GpuDef):
            p.emit(f"gpu {item.name} {{ {kwargs(item.kwargs)} }}", item, 0)
        elif isinstance(item, ast.ModelDef):
            _model(p, item)
        elif isinstance(item, ast.BudgetDef):
            _budget(p, item)
    p.rest(0)
    return "\n".join(p.lines).rstrip("\n") + "\n"
