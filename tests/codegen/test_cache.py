"""The kernel cache: key, atomic files, LTMDSL_CACHE_DIR, memo, concurrent compiles, LTMDSL_PRINT_CODE."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltmdsl.codegen import cache
from ltmdsl.codegen.kernelspec import rmsnorm_spec, selective_scan_spec
from ltmdsl.codegen.render import render



@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LTMDSL_CACHE_DIR", str(tmp_path / "kc"))
    return tmp_path / "kc"


def test_default_cache_dir(monkeypatch):
    monkeypatch.delenv("LTMDSL_CACHE_DIR", raising=False)
    assert cache.cache_dir() == Path.home() / ".cache" / "ltmdsl" / "kernels"


def test_key_covers_source_and_versions(monkeypatch):
    src = render(rmsnorm_spec(d=64, residual=True, dtype="bf16", upcast=False))
    key = cache.kernel_key(src)
    assert key == cache.kernel_key(src) and len(key) == 64
    assert cache.kernel_key(src + "\n") != key
    monkeypatch.setattr(cache, "_triton_version", lambda: "0.0.0-other")
    assert cache.kernel_key(src) != key


def test_compile_writes_imports_and_memoises(cache_dir):
    spec = rmsnorm_spec(d=64, residual=False, dtype="fp32")
    ck = cache.compile_spec(spec)
    assert ck.path.parent == cache_dir and ck.path.read_text() == ck.source
    assert ck.path.name == f"{spec.name}_{ck.key[:16]}.py"
    assert ck.meta["add_rmsnorm_fwd"]["BLOCK_D"] == 64
    assert cache.compile_spec(spec) is ck  # memo
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]  # no temp files left
    cache.clear_memo()
    again = cache.compile_spec(spec)  # from the file on disk
    assert again is not ck and again.key == ck.key and again.path == ck.path


def test_write_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "k.py"
    cache.write_atomic(target, "a" * 1000)
    cache.write_atomic(target, "b")
    assert target.read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.py"]


_WORKER = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
from ltmdsl.codegen.cache import compile_spec
from ltmdsl.codegen.kernelspec import selective_scan_spec
ck = compile_spec(selective_scan_spec(d_state=16, dtype="fp32"))
print(ck.key)
"""


def test_two_processes_compiling_the_same_key(cache_dir):
    env = dict(os.environ, LTMDSL_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    keys = {o[0].strip() for o in outs}
    assert len(keys) == 1
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].read_text() == render(selective_scan_spec(d_state=16, dtype="fp32", upcast=True))


def test_print_code(cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("LTMDSL_PRINT_CODE", "1")
    cache.compile_spec(rmsnorm_spec(d=32, residual=True, dtype="fp32"))
    err = capsys.readouterr().err
    assert "ltmdsl: compiling rmsnorm_residual_fp32" in err and "def add_rmsnorm_fwd(" in err


def test_a_kernel_failing_the_lint_is_not_written(cache_dir, monkeypatch):
    from ltmdsl.codegen import lint

    monkeypatch.setattr(lint, "SMEM_LIMIT_BYTES", 1)  # every dot now "exceeds" shared memory
    from ltmdsl.codegen.kernelspec import attention_spec

    spec = attention_spec(group=2, head_dim=16, v_head_dim=16, causal=True, window=False, dtype="fp32")
    with pytest.raises(lint.LintError):
        cache.compile_spec(spec)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


# ---- the cache executes only what this process rendered ------------------------------------------

_MARKER = "LTMDSL_TEST_FORGED_CODE_RAN"


def _evil_code(path):
    return compile(f"import os\nos.environ[{_MARKER!r}] = '1'\nMETA = {{}}\n", str(path), "exec")


def test_a_forged_pyc_is_never_executed(cache_dir, monkeypatch):
    import importlib.util
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    monkeypatch.delenv(_MARKER, raising=False)
    spec = rmsnorm_spec(d=64, residual=False, dtype="fp32")
    path = cache.compile_spec(spec).path
    st = path.stat()
    pyc = Path(importlib.util.cache_from_source(str(path)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(_code_to_timestamp_pyc(_evil_code(path), st.st_mtime, st.st_size))  # valid for the source
    cache.clear_memo()
    again = cache.compile_spec(spec)
    assert _MARKER not in os.environ
    assert again.meta["add_rmsnorm_fwd"]["BLOCK_D"] == 64


def test_no_bytecode_is_written(cache_dir):
    cache.compile_spec(rmsnorm_spec(d=32, residual=False, dtype="fp32"))
    assert not (cache_dir / "__pycache__").exists()


def test_a_tampered_source_is_rewritten_not_executed(cache_dir, monkeypatch):
    import linecache
    import inspect

    monkeypatch.delenv(_MARKER, raising=False)
    spec = rmsnorm_spec(d=64, residual=True, dtype="fp32")
    ck = cache.compile_spec(spec)
    ck.path.write_text(f"import os\nos.environ[{_MARKER!r}] = '1'\n" + ck.source)
    linecache.clearcache()
    cache.clear_memo()
    again = cache.compile_spec(spec)
    assert _MARKER not in os.environ
    assert ck.path.read_text() == ck.source  # regenerated
    assert _MARKER not in inspect.getsource(again.module)  # what triton reads is what ran


def test_cache_dir_is_private(cache_dir):
    cache.compile_spec(rmsnorm_spec(d=32, residual=False, dtype="fp32"))
    assert cache_dir.stat().st_mode & 0o777 == 0o700


def test_a_world_writable_cache_dir_of_ours_is_repaired(cache_dir):
    cache_dir.mkdir()
    os.chmod(cache_dir, 0o777)
    cache.compile_spec(rmsnorm_spec(d=32, residual=False, dtype="fp32"))
    assert cache_dir.stat().st_mode & 0o777 == 0o700


def test_a_cache_dir_owned_by_someone_else_is_refused(cache_dir, monkeypatch):
    cache_dir.mkdir()
    owner = cache_dir.stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    with pytest.raises(cache.CacheDirError, match="owned by uid"):
        cache.compile_spec(rmsnorm_spec(d=48, residual=False, dtype="fp32"))
    assert not list(cache_dir.iterdir())
