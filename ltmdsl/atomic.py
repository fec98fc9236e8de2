"""Atomic file and folder writes: readers see the old content or the new, never a part.

Every output ltmdsl writes (formatted specs, plots, checkpoints, generated kernels, exported folders)
goes through here: a temporary sibling is written, flushed, given the mode a plain open() would give
(0666 less the umask), then renamed. Folders (`directory`) are replaced only when provably ltmdsl's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, briefly, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask_mode(mode: int) -> int:
    return mode & ~_umask()


def write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically (same-directory temp file, fsync, os.replace).

    `mode` gives the new file's permission bits (to keep those of a file being rewritten); by default it is
    an ordinary file under the umask.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666) if mode is None else mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), mode)


@contextlib.contextmanager
def temporary_sibling(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file path next to `path`; on success it replaces `path`, on error it is removed.

    For writers that need a file name (safetensors, matplotlib) rather than bytes.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: The record that makes a folder provably ltmdsl's own output: every file it holds, with size and sha256.
OUTPUT_RECORD = ".ltmdsl-output.json"
OUTPUT_FORMAT = "ltmdsl-output/1"
_MAX_RECORD_BYTES = 4 * 2**20


class NotOwnOutput(FileExistsError):
    """An existing folder that ltmdsl will not replace: not provably its own output."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} exists and is not an earlier ltmdsl output ({why}); refusing to replace it "
                         "(move it away or choose another folder)")
        self.path = path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _inventory(folder: Path) -> dict[str, Path]:
    """relative path -> path of every file under `folder` except the record; NotOwnOutput on a symlink or
    anything but a regular file or folder."""
    out: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                raise NotOwnOutput(folder, f"it holds a symlink, {p.relative_to(folder)}")
            if name in files:
                if not stat.S_ISREG(st.st_mode):
                    raise NotOwnOutput(folder, f"{p.relative_to(folder)} is not a regular file")
                rel = p.relative_to(folder).as_posix()
                if rel != OUTPUT_RECORD:
                    out[rel] = p
    return out


def check_replaceable(path: str | os.PathLike) -> None:
    """Return if `path` may be replaced by a new output folder: it does not exist, is an empty folder, or
    is provably ltmdsl's own output (a record in our format listing exactly the files present, each with
    its size and sha256, and no symlinks). Otherwise raise NotOwnOutput and touch nothing."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise NotOwnOutput(path, "it is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise NotOwnOutput(path, "it is not a folder")
    files = _inventory(path)
    record_path = path / OUTPUT_RECORD
    if not os.listdir(path):
        return
    if not record_path.is_file():
        raise NotOwnOutput(path, f"it has no {OUTPUT_RECORD}")
    try:
        if record_path.stat().st_size > _MAX_RECORD_BYTES:
            raise ValueError("too large")
        record = json.loads(record_path.read_text(encoding="utf-8"))
        listed = record["files"]
        ok = record.get("format") == OUTPUT_FORMAT and isinstance(listed, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in listed.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise NotOwnOutput(path, f"its {OUTPUT_RECORD} is not in ltmdsl's format")
    if set(listed) != set(files):
        extra = sorted(set(files) - set(listed)) or sorted(set(listed) - set(files))
        raise NotOwnOutput(path, f"its files differ from the ones ltmdsl wrote ({', '.join(extra[:3])})")
    parents = {parent.as_posix() for rel in files for parent in Path(rel).parents} - {"."}
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            rel = (Path(root) / name).relative_to(path).as_posix()
            if rel not in parents:
                raise NotOwnOutput(path, f"it holds a folder ltmdsl did not write, {rel}")
    for rel, p in files.items():
        if p.stat().st_size != listed[rel]["size"] or _sha256(p) != listed[rel]["sha256"]:
            raise NotOwnOutput(path, f"{rel} was changed after ltmdsl wrote it")


def _write_record(folder: Path) -> None:
    files = {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in sorted(_inventory(folder).items())}
    with open(folder / OUTPUT_RECORD, "w", encoding="utf-8") as f:
        json.dump({"format": OUTPUT_FORMAT, "files": files}, f, indent=1, sort_keys=True)
        f.write("\n")


def _normalise_modes(folder: Path) -> None:
    """Give every file and folder the mode a plain open() / mkdir() would (0666 / 0777 less the umask)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(Path(root) / name, _umask_mode(0o666))
        for name in dirs:
            os.chmod(Path(root) / name, _umask_mode(0o777))
    os.chmod(folder, _umask_mode(0o777))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """An exclusive lock on the parent folder (flock on its descriptor): writers of one folder take turns,
    and no lock file is left behind."""
    fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; on success it is swapped in as `path`.

    The one way ltmdsl writes an output folder (compile, export-hf). `path` is replaced only if it does
    not exist, is empty, or is provably ltmdsl's own output (`check_replaceable`, checked before anything
    is written and again under the lock before the swap); otherwise NotOwnOutput is raised and nothing is
    touched. The finished folder gets a record of its files (OUTPUT_RECORD) and the modes a plain open()
    would give. Concurrent writers of the same folder take turns on a lock of the parent folder: the last
    one wins and no temporary folder is left behind.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _write_record(tmp)
        _normalise_modes(tmp)
        with _parent_lock(path.parent):
            check_replaceable(path)
            if not os.path.lexists(path):
                os.rename(tmp, path)
            elif _exchange(tmp, path):
                shutil.rmtree(tmp)  # tmp now holds the previous output
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "previous")
                os.rename(tmp, path)
                shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CacheDirError(PermissionError):
    """A cache folder that others could write into: code or pickles read from it cannot be trusted."""


def private_dir(path: Path, what: str = "cache", hint: str = "") -> Path:
    """Create `path` as a 0700 directory, or check an existing one: it must be a real directory owned by
    this user; group/world access is removed (repaired). CacheDirError otherwise, naming the cache (`what`:
    the kernel cache executes the files it holds, Lark unpickles the grammar cache) and how to move it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"{what} {path} is not a directory (a symlink or a file); refusing to use it")
    if st.st_uid != os.getuid():
        raise CacheDirError(f"{what} {path} is owned by uid {st.st_uid}, not by this user; refusing to "
                            f"execute code from it{f' ({hint})' if hint else ''}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path
