"""Diagnostics: every problem in a spec is a `file:line:col: error: message` with the line and a caret.

Checks collect `Diagnostic`s instead of stopping at the first one; `SpecError` carries them all. It is the
only exception type that bad input may raise out of `ltmdsl.load`.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_MESSAGE = 400  # characters of a rendered message; user text inside is shortened, never echoed in bulk
SOURCE_WINDOW = 100  # characters of the quoted source line shown on each side of the caret


def split_lines(text: str) -> list[str]:
    """The lines of a spec: a line ends at LF (`\\n`) and nowhere else.

    This is the lexer's definition (Lark counts LF only), so a lone CR, a form feed or U+2028 inside a
    comment does not shift the line a diagnostic quotes; `str.splitlines` would split at all of them.
    A CR before the LF (Windows line ends) stays on the line and is dropped when the line is shown.
    """
    return text.split("\n")


def source_line(text: str, line: int) -> str:
    """Line `line` (1-based) of `text` by `split_lines`, or '' past the end."""
    lines = split_lines(text)
    return lines[line - 1] if 0 < line <= len(lines) else ""


def escape(text: str) -> str:
    """`text` safe for a terminal: control and other non-printable characters become `\\x1b`-style escapes.

    A spec, a file name or a legend symbol may hold terminal escape sequences; diagnostics show them
    as text instead of letting them act on the user's terminal.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


@dataclass(frozen=True)
class Diagnostic:
    """One message about a spec, pointing at a position in its source."""

    file: str
    line: int  # 1-based; 0 when the problem has no position (a missing file)
    col: int  # 1-based
    message: str
    severity: str = "error"  # "error" | "warning" | "note"
    source_line: str = ""

    def render(self) -> str:
        where = f"{escape(self.file)}:{self.line}:{self.col}" if self.line else escape(self.file)
        message = escape(self.message)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        out = f"{where}: {self.severity}: {message}"
        if self.line and self.source_line:
            text = self.source_line.removesuffix("\r").replace("\t", " ")
            left, right = escape(text[: max(self.col - 1, 0)]), escape(text[max(self.col - 1, 0):])
            if len(left) + len(right) > 2 * SOURCE_WINDOW:  # a window around the caret for long lines
                keep_left = max(SOURCE_WINDOW, 2 * SOURCE_WINDOW - len(right))
                if len(left) > keep_left:
                    left = "..." + left[-(keep_left - 3):]
                if len(right) > 2 * SOURCE_WINDOW - len(left):
                    right = right[: max(2 * SOURCE_WINDOW - len(left) - 3, 1)] + "..."
            out += f"\n    {left}{right}\n    {' ' * len(left)}^"
        return out

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "col": self.col,
                "severity": self.severity, "message": self.message}


class SpecError(Exception):
    """A spec is invalid; `diagnostics` lists every error (and warning) found."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


class Reporter:
    """Collects diagnostics for one load; knows each file's text to quote the offending line."""

    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []
        self._texts: dict[str, list[str]] = {}
        self._seen: set[tuple] = set()

    def add_source(self, file: str, text: str) -> None:
        self._texts[file] = split_lines(text.removeprefix("\ufeff"))  # the parser drops a BOM too

    def _line(self, file: str, line: int) -> str:
        lines = self._texts.get(file, [])
        return lines[line - 1] if 0 < line <= len(lines) else ""

    def _add(self, d: Diagnostic) -> None:
        """Keep `d` unless the same message at the same place is already kept.

        A definition can be reached along several paths (a layer used with and without per-position
        overrides, a global layer used by two models); the user needs to read each problem once.
        """
        key = (d.file, d.line, d.col, d.severity, d.message)
        if key not in self._seen:
            self._seen.add(key)
            self.diagnostics.append(d)

    def error(self, file: str, line: int, col: int, message: str) -> None:
        self._add(Diagnostic(file, line, col, message, "error", self._line(file, line)))

    def warning(self, file: str, line: int, col: int, message: str) -> None:
        self._add(Diagnostic(file, line, col, message, "warning", self._line(file, line)))

    def at(self, pos, message: str, severity: str = "error") -> None:
        """Report at a SourcePos-like object (file, line, col)."""
        (self.warning if severity == "warning" else self.error)(pos.file, pos.line, pos.col, message)

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)

    def raise_if_errors(self) -> None:
        """Raise every diagnostic so far, in source order, if any is an error."""
        if self.has_errors:
            files = list(dict.fromkeys(d.file for d in self.diagnostics))
            raise SpecError(sorted(self.diagnostics, key=lambda d: (files.index(d.file), d.line, d.col)))

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]
