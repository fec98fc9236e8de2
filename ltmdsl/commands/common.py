"""What every command shares: loading specs with rendered diagnostics, exit codes, atomic writes."""

from __future__ import annotations

import sys

from ltmdsl import atomic
from ltmdsl.errors import SpecError
from ltmdsl.loader import Spec, load

EXIT_OK, EXIT_SPEC, EXIT_USAGE, EXIT_BUDGET = 0, 1, 2, 3


def load_or_report(path: str, show_warnings: bool = True) -> tuple[Spec | None, int]:
    """(spec, 0), or (None, exit code) after printing every diagnostic to stderr."""
    try:
        spec = load(path)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        usage = all(d.line == 0 for d in e.diagnostics)  # a missing file or a directory
        return None, EXIT_USAGE if usage else EXIT_SPEC
    if show_warnings:
        for w in spec.warnings:
            print(w.render(), file=sys.stderr)
    return spec, EXIT_OK


def select_model(spec: Spec, name: str | None):
    """The named model of a loaded spec (the last one when no name is given); None after printing the choices."""
    try:
        return spec.ir.model(name)
    except KeyError:
        names = ", ".join(m.name for m in spec.ir.models)
        print(f"{spec.path}: error: no model '{name}' (models: {names})", file=sys.stderr)
        return None


def load_model(path: str, name: str | None, show_warnings: bool = True):
    """(spec, model, 0) for the named (or last) model of a spec file, or (None, None, exit code) after
    printing why: what `show`, `stream`, `compile` and `emit` all start with."""
    spec, code = load_or_report(path, show_warnings)
    if spec is None:
        return None, None, code
    model = select_model(spec, name)
    if model is None:
        return None, None, EXIT_USAGE
    return spec, model, EXIT_OK


def atomic_write_text(path: str, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    atomic.write_text(path, text)
