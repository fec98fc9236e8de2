"""Checking a safetensors file from its header alone, before a single tensor is allocated.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}} and the tensor bytes. A hostile or truncated file can declare
anything there, so everything that reads weights (runtime checkpoints, `from_hf`, `export-hf`) first reads
the header with `read_header` (bounded, validated: offsets inside the file, sizes consistent with shape and
dtype), compares each tensor's name, shape and dtype with what the model needs (`check_tensors`), and
refuses a model this machine cannot hold (`check_fits`, from MemAvailable in /proc/meminfo). This module
imports neither torch nor the parser.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass

#: safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000

#: bytes per element of every safetensors dtype.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

#: torch dtype names (str(torch.float32) without "torch.") -> safetensors dtype.
TORCH_TO_SAFETENSORS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                        "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                        "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


class TensorFileError(ValueError):
    """A safetensors file that is malformed, does not match the model, or would not fit in memory."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it."""

    dtype: str  # safetensors dtype, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Header:
    """The validated header of a safetensors file."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_header(path: str | os.PathLike) -> Header:
    """The header of the safetensors file at `path`, validated against the file's size; reads only the header."""
    p = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO must not hang the open; anything but a regular file is refused below
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise TensorFileError(f"{p}: not a regular file")
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise TensorFileError(f"{p}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise TensorFileError(f"{p}: not a safetensors file (declares a {n}-byte header in a {size}-byte file)")
            raw = f.read(n)
    except OSError as e:
        raise TensorFileError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TensorFileError(f"{p}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{p}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TensorFileError(f"{p}: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise TensorFileError(f"{p}: tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise TensorFileError(f"{p}: tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(type(d) is int and 0 <= d < 2**62 for d in shape)):
            raise TensorFileError(f"{p}: tensor {name!r}: shape {shape!r} is not a list of dimensions")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise TensorFileError(f"{p}: tensor {name!r}: data offsets {offsets!r} lie outside the file's "
                                  f"{data_size} data bytes")
        info = TensorInfo(dtype, tuple(shape))
        if offsets[1] - offsets[0] != info.nbytes:
            raise TensorFileError(f"{p}: tensor {name!r}: {offsets[1] - offsets[0]} bytes stored for shape "
                                  f"{info.shape} of {dtype} ({info.nbytes} bytes)")
        tensors[name] = info
    return Header(p, tensors, meta)


def check_tensors(header: Header, expected: dict[str, TensorInfo], *, what: str = "the model") -> None:
    """Raise TensorFileError unless the header holds exactly the `expected` names with their shapes and dtypes."""
    names, want = set(header.tensors), set(expected)
    missing, unexpected = sorted(want - names), sorted(names - want)
    if missing or unexpected:
        raise TensorFileError(f"{header.path}: tensors do not match {what} "
                              f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    for name in sorted(want):
        got, need = header.tensors[name], expected[name]
        if got.shape != need.shape:
            raise TensorFileError(f"{header.path}: {name} has shape {got.shape}, {what} needs {need.shape}")
        if got.dtype != need.dtype:
            raise TensorFileError(f"{header.path}: {name} is {got.dtype}, {what} needs {need.dtype}")


def available_bytes() -> int | None:
    """Memory this machine can still give a process: MemAvailable from /proc/meminfo (None if unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes: int, what: str) -> None:
    """Raise TensorFileError if allocating `nbytes` for `what` would exceed the memory available now."""
    have = available_bytes()
    if have is not None and nbytes > have:
        raise TensorFileError(f"{what} needs {nbytes / 2**30:.2f} GiB, but this machine has only "
                              f"{have / 2**30:.2f} GiB of memory available (MemAvailable); refusing to allocate it")
