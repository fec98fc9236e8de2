"""The kernel cache: generated source -> key -> file on disk -> imported module, memoised.

    key = sha256(source + triton version + ltmdsl version)

Files live in `cache_dir()` (LTMDSL_CACHE_DIR, default ~/.cache/ltmdsl/kernels) as `<name>_<key16>.py`.
Writes are atomic (a temp file in the same directory, fsync, os.replace), so two processes compiling
the same key at once both end with the same complete file, and a reader never sees half a file.
Triton's JIT needs a kernel's source in a real file (inspect.getsource), which is why kernels are
written and imported rather than exec'd from strings. Every source passes the lint (codegen/lint.py)
before it is imported; LTMDSL_PRINT_CODE=1 prints each source to stderr as it is compiled.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ltmdsl import atomic
from ltmdsl.codegen.kernelspec import KernelSpec
from ltmdsl.codegen.lint import lint_or_raise
from ltmdsl.codegen.render import render


def cache_dir() -> Path:
    """LTMDSL_CACHE_DIR if set, else ~/.cache/ltmdsl/kernels."""
    env = os.environ.get("LTMDSL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ltmdsl" / "kernels"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # rendering and `ltmdsl compile` work without triton
        return "none"


def kernel_key(source: str) -> str:
    """sha256 over the source, the triton version and the ltmdsl version."""
    from ltmdsl import __version__

    h = hashlib.sha256()
    for part in (source, _triton_version(), __version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and os.replace (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # unreadable: rewrite it
        if path.exists() and path.read_text() == text:
            return
    atomic.write_text(path, text)


@dataclass(frozen=True)
class CompiledKernel:
    """A rendered, linted, written and imported kernel module."""

    spec: KernelSpec
    source: str
    key: str
    path: Path
    module: ModuleType

    @property
    def meta(self) -> dict:
        """kernel name -> constexpr values and launch options (the module's META dict)."""
        return self.module.META


_MEMO: dict[str, CompiledKernel] = {}
_BY_SPEC: dict[tuple[KernelSpec, str], CompiledKernel] = {}
_LOCK = threading.RLock()


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton looks kernels' globals up through their module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def compile_spec(spec: KernelSpec) -> CompiledKernel:
    """Render, lint, write and import `spec` (memoised by spec and cache directory, then by key)."""
    where = str(cache_dir())
    with _LOCK:
        hit = _BY_SPEC.get((spec, where))
        if hit is not None:
            return hit
        source = render(spec)
        key = kernel_key(source)
        hit = _MEMO.get(key + where)
        if hit is None:
            lint_or_raise(source, spec)
            if os.environ.get("LTMDSL_PRINT_CODE", "") not in ("", "0"):
                print(f"# ---- ltmdsl: compiling {spec.name} (key {key[:16]}) ----\n{source}", file=sys.stderr)
            path = Path(where) / f"{spec.name}_{key[:16]}.py"
            write_atomic(path, source)
            module = _import(path, f"_ltmdsl_kernel_{spec.name}_{key[:16]}")
            hit = CompiledKernel(spec, source, key, path, module)
            _MEMO[key + where] = hit
        _BY_SPEC[(spec, where)] = hit
        return hit


def clear_memo() -> None:
    """Forget imported kernels (tests use it to exercise the disk path)."""
    with _LOCK:
        _MEMO.clear()
        _BY_SPEC.clear()
