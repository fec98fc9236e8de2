"""Number suffixes, byte units and dtypes of the spec language.

Counts: K, M, G, T are decimal (100M = 100,000,000); Ki, Mi, Gi, Ti are binary (128Ki = 131,072).
Bytes: B, KB, MB, GB, TB decimal; KiB, MiB, GiB, TiB binary. `80GB` lexes as `80G` then `B`, which is
the same number of bytes.
"""

from __future__ import annotations

from ltmdsl.ir import Dtype

COUNT_SUFFIXES: dict[str, int] = {
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}

BYTE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}

DTYPES: dict[str, Dtype] = {
    d.name: d
    for d in (
        Dtype("fp32", 4),
        Dtype("bf16", 2),
        Dtype("fp16", 2),
        Dtype("fp8_e4m3", 1),
        Dtype("fp8_e5m2", 1),
    )
}
# `fp8` alone means e4m3, the usual choice for KV caches and weights.
DTYPE_ALIASES = {"fp8": "fp8_e4m3", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype(name: str) -> Dtype | None:
    """The Dtype for a spec name or alias, else None."""
    return DTYPES.get(DTYPE_ALIASES.get(name, name))


def format_bytes(n: int | float, binary: bool = True) -> str:
    """Human units: GiB/MiB for binary (default), GB/MB for decimal. Never 'GB' for 2**30."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"] if binary else ["B", "KB", "MB", "GB", "TB", "PB"]
    step = 1024 if binary else 1000
    x = float(n)
    for unit in units:
        if abs(x) < step or unit == units[-1]:
            return f"{int(x)} B" if unit == "B" else f"{x:.2f} {unit}"
        x /= step
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """Compact decimal counts: 8.03B, 100M, 4.1K."""
    for div, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def format_flops(n: int | float) -> str:
    """A FLOP count with four significant digits and its exponent: `4.223e+11 FLOPs`."""
    return f"{float(n):.4g} FLOPs"
