"""Diagnostics: every problem in a spec is a `file:line:col: error: message` with the line and a caret.

Checks collect `Diagnostic`s instead of stopping at the first one; `SpecError` carries them all. It is the
only exception type that bad input may raise out of `ltmdsl.load`.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        out = f"{where}: {self.severity}: {self.message}"
        if self.line and self.source_line:
            text = self.source_line.rstrip("\n")
            if len(text) > 200:  # keep hostile one-line inputs readable
                start = max(0, self.col - 100)
                text = text[start:start + 200]
                col = self.col - start
            else:
                col = self.col
            text = text.replace("\t", " ")
            out += f"\n    {text}\n    {' ' * max(col - 1, 0)}^"
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

    def add_source(self, file: str, text: str) -> None:
        self._texts[file] = text.splitlines()

    def _line(self, file: str, line: int) -> str:
        lines = self._texts.get(file, [])
        return lines[line - 1] if 0 < line <= len(lines) else ""

    def error(self, file: str, line: int, col: int, message: str) -> None:
        self.diagnostics.append(Diagnostic(file, line, col, message, "error", self._line(file, line)))

    def warning(self, file: str, line: int, col: int, message: str) -> None:
        self.diagnostics.append(Diagnostic(file, line, col, message, "warning", self._line(file, line)))

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
