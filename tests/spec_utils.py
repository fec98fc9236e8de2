"""Test helpers for comparing IR across loads (positions and hashes differ, meaning must not)."""

from __future__ import annotations

from ltmdsl.ir import SpecIR


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("pos", "source_hash", "file")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def ir_meaning(ir: SpecIR) -> dict:
    """The IR as JSON without source positions, file names and hashes."""
    return _strip(ir.to_json())
