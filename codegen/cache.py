"""The kernel cache: generated source -> key -> file on disk -> imported module, memoised.

    key = sha256(source + triton version + ltmdsl version)

Files live in `cache_dir()` (LTMDSL_CACHE_DIR, default ~/.cache/ltmdsl/kernels) as `<name>_<key16>.py`.
Writes are atomic (a temp file in the same directory, fsync, os.replace), so two processes compiling
the same key at once both end with the same complete file, and a reader never sees half a file.
Triton's JIT needs a kernel's source in a real file (inspect.getsource), which is why kernels are
written to disk. What runs, though, is only ever the source rendered in this process: the file is read
back and compared with it (its content hash) on every load, and a file that differs (tampered, truncated)
is rewritten; the module is then executed from the verified text (compile + exec), with linecache primed
with it so that triton reads the same text, never the file again. There is no bytecode cache: no
__pycache__ is written or read. The cache directory is private (0700, owned by this user); one writable
by others is repaired if it is ours and refused if it is not. Every source passes the lint
(codegen/lint.py) before it is executed; LTMDSL_PRINT_CODE=1 prints each source to stderr as it is compiled.
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ltmdsl import atomic
from ltmdsl.atomic import CacheDirError, private_dir
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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Make `path` hold exactly `text`: kept if its content hash matches, else rewritten atomically
    (a temp file in the same directory and os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError, UnicodeDecodeError):  # unreadable or undecodable: rewrite it
        if path.is_file() and not path.is_symlink() and _digest(path.read_text(encoding="utf-8")) == _digest(text):
            return
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or path.is_dir():
            raise CacheDirError(f"kernel cache entry {path} is not a regular file; refusing to use it")
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


def _execute(path: Path, name: str, source: str) -> ModuleType:
    """A module `name` executed from `source` (already verified to be `path`'s content), never from bytecode.

    linecache is primed with `source` (mtime None: never re-read), so inspect.getsource, which triton's JIT
    uses, sees exactly the text that was executed even if the file changes meanwhile."""
    filename = str(path)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # triton looks kernels' globals up through their module
    try:
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)
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
            folder = private_dir(Path(where), "kernel cache", "set LTMDSL_CACHE_DIR to a directory of your own")
            path = folder / f"{spec.name}_{key[:16]}.py"
            write_atomic(path, source)
            module = _execute(path, f"_ltmdsl_kernel_{spec.name}_{key[:16]}", source)
            hit = CompiledKernel(spec, source, key, path, module)
            _MEMO[key + where] = hit
        _BY_SPEC[(spec, where)] = hit
        return hit


def clear_memo() -> None:
    """Forget imported kernels (tests use it to exercise the disk path)."""
    with _LOCK:
        _MEMO.clear()
        _BY_SPEC.clear()
