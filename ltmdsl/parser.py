"""Text to syntax tree: Lark (LALR, contextual lexer) with friendly errors and guards against hostile input.

Every failure becomes a `SpecError` with `file:line:col` and a caret; nothing here raises anything else.
Guards run before Lark sees the text: size, UTF-8, nesting depth, literal and identifier lengths.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ltmdsl import ast, atomic
from ltmdsl.errors import Diagnostic, SpecError, source_line, split_lines
from ltmdsl.ir import SourcePos

MAX_FILE_BYTES = 4 * 2**20
MAX_NESTING = 64
MAX_NAME_LEN = 128
MAX_NUMBER_LEN = 40
MAX_OPERATOR_RUN = 64
MAX_TREE_DEPTH = 120  # statement levels plus expression nesting; real specs stay under 20

#: Terminal names as a user would write them, for "expected ..." messages.
_TERMINAL_TEXT = {
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "EQUAL": "'='", "COMMA": "','",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "PERCENT": "'%'", "NAME": "a name",
    "NUMBER": "a number", "STRING": "a string", "UNIT": "a byte unit", "CMP": "'<='", "MODE": "inference or training",
    "__ANON_0": "'//'", "__ANON_1": "'**'", "SHARED": "'shared'", "$END": "end of file",
}


def _grammar_cache() -> str | bool:
    """Where Lark keeps the analysed grammar between runs: a file in the user's private cache folder
    ($XDG_CACHE_HOME/ltmdsl/grammar, else ~/.cache/ltmdsl/grammar, 0700 and theirs), or False (no cache)
    where that folder cannot be made or trusted, or LTMDSL_NO_CACHE is set.

    Building the LALR tables takes about 60 ms of every `ltmdsl check`; Lark names the cache by the
    grammar's and its options' hash and rebuilds (and rewrites) it when they change or it cannot be read.
    A private folder, as for the kernel cache, since Lark unpickles the file.
    """
    if os.environ.get("LTMDSL_NO_CACHE"):
        return False
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ltmdsl" / "grammar"
        # one file per Lark and Python version, so that two environments sharing the folder do not rewrite it
        name = f"ltm-lark{lark.__version__}-py{sys.version_info[0]}{sys.version_info[1]}.lark-cache"
        return str(atomic.private_dir(root, "grammar cache") / name)
    except (OSError, RuntimeError):  # CacheDirError, or no home folder: parse without a cache rather than fail
        return False


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = resources.files("ltmdsl.grammar").joinpath("ltm.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True,
                cache=_grammar_cache())


def decode(data: bytes, path: str) -> str:
    """UTF-8 text of a spec file, or a SpecError pointing at the first invalid byte."""
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(Diagnostic(path, 0, 0, f"file is {len(data)} bytes; specs are limited to {MAX_FILE_BYTES} bytes"))
    try:
        return strip_bom(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise SpecError(Diagnostic(path, line, col, f"invalid UTF-8 (byte 0x{data[e.start]:02x}); a spec must be UTF-8 text")) from None


BOM = "\ufeff"


def strip_bom(text: str) -> str:
    """Text without a leading UTF-8 byte order mark, which some Windows editors write; specs accept it."""
    return text[1:] if text.startswith(BOM) else text


_GUARD_RE = re.compile(r'#[^\n]*|"[^"\n]*"|[(){}]|[A-Za-z_][A-Za-z0-9_]*|[0-9][0-9_.eE]*|[-+*/]+')


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _guard(text: str, path: str) -> None:
    """Refuse input that would make the parser or tree walkers slow or recursive, before parsing."""
    depth = 0
    for m in _GUARD_RE.finditer(text):
        tok = m.group()
        c = tok[0]
        problem = None
        if c in "({":
            depth += 1
            if depth > MAX_NESTING:
                problem = f"nesting deeper than {MAX_NESTING} levels"
        elif c in ")}":
            depth -= 1
        elif c.isalpha() or c == "_":
            if len(tok) > MAX_NAME_LEN:
                problem = f"identifier of {len(tok)} characters (at most {MAX_NAME_LEN})"
        elif c.isdigit():
            if len(tok) > MAX_NUMBER_LEN:
                problem = f"number literal of {len(tok)} characters (at most {MAX_NUMBER_LEN})"
        elif c in "-+*/" and len(tok.replace("**", "*").replace("//", "/")) > MAX_OPERATOR_RUN:
            problem = f"a run of {len(tok)} operators"
        if problem:
            line, col = _line_col(text, m.start())
            raise SpecError(Diagnostic(path, line, col, problem, source_line=source_line(text, line)))


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    value = str(token)
    return f"'{value[:40]}'" + ("..." if len(value) > 40 else "")


def _expected(names) -> str:
    words = sorted({_TERMINAL_TEXT.get(n, f"'{n.lower()}'") for n in names})
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


_BRACE_RE = re.compile(r'#[^\n]*|"[^"\n]*"|[{}]')
_TOP_LEVEL_RE = re.compile(r"^[ \t]*(use|const|gpu|model|budget)\b", re.MULTILINE)


def _unclosed_block(text: str, offset: int, path: str, at_end: bool) -> list[Diagnostic] | None:
    """An error and a note when a syntax error at `offset` comes from a block left open, else None.

    A missing `}` only shows up later, often as a puzzling "unexpected NAME" inside the next definition
    (`budget` lexes as a setting name inside a model). When a `{` is still open at the error, and either the
    file ended or a top-level keyword starts a line since that `{`, the user needs to hear which block is
    unclosed and where it opened.
    """
    opened: list[int] = []
    for m in _BRACE_RE.finditer(text, 0, offset):
        if m.group() == "{":
            opened.append(m.start())
        elif m.group() == "}" and opened:
            opened.pop()
    if not opened:
        return None
    brace = opened[-1]
    line_start = text.rfind("\n", 0, brace) + 1
    header = " ".join(text[line_start:brace].split())
    header = (header[:40] + "...") if len(header) > 40 else header
    what = f"'{header} {{'" if header else "the '{'"
    open_line, open_col = _line_col(text, brace)
    note = Diagnostic(path, open_line, open_col, f"{what} opens here", "note", source_line(text, open_line))
    keyword = _TOP_LEVEL_RE.search(text, brace, offset)
    if keyword is not None:
        line, col = _line_col(text, keyword.start(1))
        message = f"missing '}}': {what} from line {open_line} is still open at this '{keyword.group(1)}'"
    elif at_end:
        body = text.rstrip()
        line, col = _line_col(text, len(body))  # just after the last character
        message = f"unexpected end of file: missing '}}' to close {what} from line {open_line}"
    else:
        return None
    return [Diagnostic(path, line, col, message, source_line=source_line(text, line)), note]


def _syntax_error(e: UnexpectedInput, text: str, path: str) -> list[Diagnostic]:
    """The diagnostics for a Lark parse error: an unclosed block if that explains it, else what was unexpected."""
    at_end = isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END")
    if isinstance(e, UnexpectedToken) and not at_end:
        offset = e.token.start_pos
    elif isinstance(e, UnexpectedCharacters):
        offset = e.pos_in_stream
    else:
        offset = len(text)
    unclosed = _unclosed_block(text, offset or 0, path, at_end)
    return unclosed if unclosed is not None else [_unexpected(e, text, path)]


_SUFFIXES = ("K", "M", "G", "T", "Ki", "Mi", "Gi", "Ti")
_UNITS = ("B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")
_NUMBER_BEFORE_RE = re.compile(r"[0-9][0-9_]*(\.[0-9]+)?([eE][+-]?[0-9]+)?$")


def _suffix_hint(tok: Token, text: str) -> str:
    """'; did you mean '100M'?...' when a name glued to a number is a suffix or unit in the wrong case."""
    if tok.type != "NAME" or tok.start_pos is None:
        return ""
    number = _NUMBER_BEFORE_RE.search(text, max(0, tok.start_pos - MAX_NUMBER_LEN), tok.start_pos)
    if number is None:
        return ""
    word = str(tok)
    for options, kind in ((_SUFFIXES, "count suffixes"), (_UNITS, "byte units")):
        for option in options:
            if word.lower() == option.lower():
                return (f"; did you mean '{number.group()}{option}'? ({kind} are case-sensitive: "
                        f"{' '.join(options)})")
    return ""


def _unexpected(e: UnexpectedInput, text: str, path: str) -> Diagnostic:
    lines = split_lines(text.rstrip("\n"))
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        what = f"unexpected character {ch!r}" if ch.isprintable() else f"unexpected character U+{ord(ch):04X}"
        line, col = e.line, e.column
    elif isinstance(e, UnexpectedToken):
        tok = e.token
        what = f"unexpected {_describe(tok)}"
        if tok.type == "$END":
            line = len(lines) or 1
            col = len(lines[-1]) + 1 if lines else 1
        else:
            line, col = tok.line, tok.column
        if e.expected:
            what += f"; expected {_expected(e.expected)}"
        what += _suffix_hint(tok, text)
    elif isinstance(e, UnexpectedEOF):
        line = len(lines) or 1
        col = len(lines[-1]) + 1 if lines else 1
        what = "unexpected end of file"
    else:  # pragma: no cover - lark has no other UnexpectedInput subclasses
        line, col, what = getattr(e, "line", 1), getattr(e, "column", 1), str(e)
    line = max(int(line), 1)
    col = max(int(col), 1)
    src = lines[line - 1] if 0 < line <= len(lines) else ""
    return Diagnostic(path, line, col, what, source_line=src)


class _ToAst(Transformer):
    """Lark tree → ltmdsl.ast nodes, each with its SourcePos."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _pos(self, meta) -> SourcePos:
        return SourcePos(self.path, getattr(meta, "line", 1), getattr(meta, "column", 1))

    def _tpos(self, tok: Token) -> SourcePos:
        return SourcePos(self.path, tok.line, tok.column)

    def _end(self, meta) -> int:
        return getattr(meta, "end_line", getattr(meta, "line", 1))

    # ---- expressions
    @v_args(meta=True)
    def number(self, meta, children):
        num, unit = children
        return ast.Num(self._pos(meta), self._end(meta), str(num), str(unit) if unit is not None else None)

    @v_args(meta=True)
    def name(self, meta, children):
        return ast.Name(self._pos(meta), self._end(meta), str(children[0]))

    @v_args(meta=True)
    def true(self, meta, _):
        return ast.Lit(self._pos(meta), self._end(meta), True)

    @v_args(meta=True)
    def false(self, meta, _):
        return ast.Lit(self._pos(meta), self._end(meta), False)

    @v_args(meta=True)
    def none(self, meta, _):
        return ast.Lit(self._pos(meta), self._end(meta), None)

    @v_args(meta=True)
    def call(self, meta, children):
        func, args = children
        args = args or ()
        pos_args = tuple(a for a in args if not isinstance(a, ast.KwArg))
        kwargs = tuple(a for a in args if isinstance(a, ast.KwArg))
        return ast.Call(self._pos(meta), self._end(meta), str(func), pos_args, kwargs)

    def args(self, children):
        return tuple(c for c in children if c is not None)

    def kwargs(self, children):
        return tuple(c for c in children if c is not None)

    @v_args(meta=True)
    def kwarg(self, meta, children):
        name, value = children
        return ast.KwArg(self._tpos(name), self._end(meta), str(name), value)

    def _bin(op):  # noqa: N805 - a small factory for the binary operator rules
        @v_args(meta=True)
        def rule(self, meta, children):
            left, right = children
            return ast.BinOp(self._pos(meta), self._end(meta), op, left, right)

        return rule

    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    floordiv = _bin("//")
    mod = _bin("%")
    pow = _bin("**")

    @v_args(meta=True)
    def neg(self, meta, children):
        return ast.Neg(self._pos(meta), self._end(meta), children[0])

    # ---- stack items
    @v_args(meta=True)
    def ref(self, meta, children):
        name, kwargs = children
        return ast.Ref(self._pos(meta), self._end(meta), str(name), kwargs)

    @v_args(meta=True)
    def repeat(self, meta, children):
        return ast.Repeat(self._pos(meta), self._end(meta), children[0], tuple(children[1:]))

    @v_args(meta=True)
    def pattern(self, meta, children):
        return ast.Pattern(self._pos(meta), self._end(meta), str(children[0])[1:-1])

    # ---- definitions
    @v_args(meta=True)
    def use_stmt(self, meta, children):
        return ast.Use(self._pos(meta), self._end(meta), str(children[0])[1:-1])

    @v_args(meta=True)
    def const_def(self, meta, children):
        return ast.ConstDef(self._pos(meta), self._end(meta), str(children[0]), children[1])

    @v_args(meta=True)
    def layer_def(self, meta, children):
        name, kind, kwargs = children
        return ast.LayerDef(self._pos(meta), self._end(meta), str(name), str(kind), self._tpos(kind), kwargs or ())

    @v_args(meta=True)
    def block_def(self, meta, children):
        shared, name, *items = children
        return ast.BlockDef(self._pos(meta), self._end(meta), str(name), shared is not None, tuple(items))

    @v_args(meta=True)
    def gpu_def(self, meta, children):
        name, kwargs = children
        return ast.GpuDef(self._pos(meta), self._end(meta), str(name), kwargs or ())

    @v_args(meta=True)
    def assign(self, meta, children):
        return ast.Assign(self._pos(meta), self._end(meta), str(children[0]), children[1])

    @v_args(meta=True)
    def legend_entry(self, meta, children):
        sym, target = children
        text = str(sym)
        if sym.type == "STRING":
            text = text[1:-1]
        return ast.LegendEntry(self._pos(meta), self._end(meta), text, str(target))

    @v_args(meta=True)
    def legend(self, meta, children):
        return ast.Legend(self._pos(meta), self._end(meta), tuple(c for c in children if c is not None))

    @v_args(meta=True)
    def stack(self, meta, children):
        return ast.Stack(self._pos(meta), self._end(meta), tuple(children))

    @v_args(meta=True)
    def override(self, meta, children):
        index, kwargs = children
        return ast.Override(self._pos(meta), self._end(meta), index, kwargs or ())

    @v_args(meta=True)
    def model_def(self, meta, children):
        return ast.ModelDef(self._pos(meta), self._end(meta), str(children[0]), tuple(children[1:]))

    @v_args(meta=True)
    def mode_stmt(self, meta, children):
        mode, kwargs = children
        return ast.ModeStmt(self._pos(meta), self._end(meta), str(mode), kwargs or ())

    @v_args(meta=True)
    def on_stmt(self, meta, children):
        count, x_word, gpu, kwargs = children
        if str(x_word) != "x":
            raise _ExpectedX(self._tpos(x_word), str(x_word))
        return ast.OnStmt(self._pos(meta), self._end(meta), count, str(gpu), self._tpos(gpu), kwargs or ())

    @v_args(meta=True)
    def require_stmt(self, meta, children):
        *names, op, limit = children
        parts = tuple((str(n), self._tpos(n)) for n in names)
        return ast.Require(self._pos(meta), self._end(meta), " + ".join(n for n, _ in parts), str(op), limit, parts)

    @v_args(meta=True)
    def budget_def(self, meta, children):
        name, model, *body = children
        return ast.BudgetDef(self._pos(meta), self._end(meta), str(name), str(model), self._tpos(model), tuple(body))

    def start(self, children):
        return tuple(children)


def _check_depth(tree, path: str, text: str) -> None:
    """Refuse a syntax tree deeper than MAX_TREE_DEPTH, found without recursion.

    Operator chains (`1 + 1 + ... + 1`, `2 ** 2 ** ... ** 2`) nest one level per operator without any
    parenthesis, so the guard cannot see them; the tree walkers that follow (the AST transformer, the
    evaluator, fmt) recurse once per level and must never meet a RecursionError.
    """
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            meta = node.meta
            line, col = getattr(meta, "line", 1), getattr(meta, "column", 1)
            raise SpecError(Diagnostic(path, line, col, f"expression nested too deeply (more than {MAX_TREE_DEPTH} "
                                       "levels of operators and brackets); split it into constants",
                                       source_line=source_line(text, line)))
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))


class _ExpectedX(Exception):
    def __init__(self, pos: SourcePos, got: str):
        self.pos, self.got = pos, got


def parse(text: str, path: str = "<string>") -> ast.SpecFile:
    """Parse spec text into a SpecFile; raises SpecError (never anything else) on bad input."""
    text = strip_bom(text)
    _guard(text, path)
    comments: list[ast.Comment] = []
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise SpecError(_syntax_error(e, text, path)) from None
    except LarkError as e:  # pragma: no cover - defensive: any other Lark failure
        raise SpecError(Diagnostic(path, 1, 1, f"could not parse: {e}")) from None
    _check_depth(tree, path, text)
    try:
        items = _ToAst(path).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, _ExpectedX):
            p = e.orig_exc.pos
            src = source_line(text, p.line)
            raise SpecError(Diagnostic(path, p.line, p.col, f"expected 'x' in 'on COUNT x GPU', got '{e.orig_exc.got}'",
                                       source_line=src)) from None
        raise
    except RecursionError:
        raise SpecError(Diagnostic(path, 1, 1, "expression nested too deeply")) from None
    for m in re.finditer(r'"[^"\n]*"|#[^\n]*', text):
        if m.group().startswith("#"):
            line, col = _line_col(text, m.start())
            comments.append(ast.Comment(line, col, m.group().rstrip()))
    return ast.SpecFile(path, text, items, tuple(comments))
