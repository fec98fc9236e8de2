"""Start N workers, each in a torch.distributed process group, and collect what each returns.

    results = launch(fn, nproc=2, args=(...))          # N local workers forked from this process
    rank, world = init_from_env()                       # inside a process started by torchrun / a cluster

`launch` forks `nproc` workers (fork costs ~0.1 s a worker; spawn re-imports torch in each). NCCL workers
are spawned instead: a forked child cannot use CUDA once the parent has touched it (even
`torch.cuda.is_available()` can initialise it), which is how a GPU run first failed here. They
rendezvous through a FileStore in a fresh temporary directory, so no TCP port is ever fixed, and join one
process group (gloo on CPUs, NCCL when `backend="nccl"`) with a timeout, so a dead peer becomes an error
rather than a hang. Each worker returns fn(*args) (picklable) to the parent through a pipe, or its
traceback; the first failure ends the others and raises WorkerError naming the rank. Workers leave with
os._exit after destroy_process_group: forked children must not run the parent's exit handlers. A worker
starts with DTensor's sharding caches emptied (`forget_dtensor_caches`): a fork inherits the parent's, and
an entry the parent made under another group (a memory trace's fake one) would hand this rank DTensors on
that group's mesh, with the parent's rank coordinate.

`init_from_env` is the same group for a process someone else started: it reads RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun (and SLURM wrappers that export them) set them.
"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable

#: Seconds a collective may wait, and the whole run may take, unless the caller says otherwise. A rank that
#: dies is seen by its exit at once, not by this; it bounds a hang. Three minutes, because 4 to 8 gloo ranks
#: on a loaded 2-core machine can wait over a minute in one collective (an all-gather aborted at 60 s so).
DEFAULT_TIMEOUT_S = 180.0


class WorkerError(RuntimeError):
    """A worker raised, died or did not finish in time; the message names the rank and carries its traceback."""


def launch(fn: Callable[..., Any], nproc: int, args: tuple = (), *, backend: str = "gloo",
           timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 1, start_method: str | None = None) -> list[Any]:
    """Run fn(*args) on `nproc` workers in one process group; [result of rank 0, rank 1, ...].

    `timeout_s` bounds both the process group's collectives and the whole run; `threads` is each
    worker's torch thread count (1 keeps N workers from oversubscribing the cores). `start_method`:
    "fork" (the default for gloo) or "spawn" (the default for NCCL; fn and args must then be picklable
    and fn importable by name).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    import torch.distributed  # noqa: F401 - imported once here, inherited by every fork

    method = start_method or ("spawn" if backend == "nccl" else "fork")
    if method not in ("fork", "spawn"):
        raise ValueError(f"start_method must be 'fork' or 'spawn', got {method!r}")
    ctx = multiprocessing.get_context(method)
    with tempfile.TemporaryDirectory(prefix="ltmdsl-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs, conns = [], []
        for rank in range(nproc):
            parent_end, child_end = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(fn, args, rank, nproc, store_path, backend, timeout_s, threads,
                                                  child_end), daemon=True)
            p.start()
            child_end.close()
            procs.append(p)
            conns.append(parent_end)
        try:
            return _collect(procs, conns, timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)


def _collect(procs, conns, timeout_s: float) -> list[Any]:
    """Each worker's result in rank order; WorkerError at the first failure, death or the deadline."""
    results: dict[int, Any] = {}
    pending = dict(enumerate(conns))
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerError(f"ranks {sorted(pending)} did not finish within {timeout_s:.0f} s")
        for conn in multiprocessing.connection.wait(list(pending.values()), timeout=min(left, 1.0)):
            rank = next(r for r, c in pending.items() if c is conn)
            try:
                status, payload = pickle.loads(conn.recv_bytes())
            except EOFError:
                procs[rank].join(1)
                raise WorkerError(f"rank {rank} died without a result (exit code {procs[rank].exitcode})") from None
            if status == "error":
                raise WorkerError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
            del pending[rank]
    return [results[r] for r in range(len(procs))]


def _worker(fn, args, rank: int, world: int, store_path: str, backend: str, timeout_s: float, threads: int,
            conn) -> None:
    """One forked worker: join the group, run fn, send ("ok", result) or ("error", traceback), leave.
    The outcome is sent before the group is torn down, so a failing teardown cannot mask it."""
    code = 0
    try:
        import torch
        import torch.distributed as dist

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world))
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(threads)
        forget_dtensor_caches()  # the parent's entries hold its meshes (another group, another rank)
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        message = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent as text
        code, message = 1, ("error", traceback.format_exc())
    try:
        _send(conn, message)
    except Exception:  # noqa: BLE001 - an unpicklable result, or the parent already gone
        code = 1
        try:
            _send(conn, ("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(code)


def forget_dtensor_caches() -> None:
    """Empty DTensor's process-global sharding-propagation caches (in Python, its tensor-meta cache and the C++
    dispatch fast path's). They are keyed by DeviceMesh equality, which ignores the process group and this
    rank's place in it, and their results carry the mesh they were computed on: an entry made under another
    group (a fake-group trace; a forked parent's) gives later ops outputs on that group's mesh, whose
    coordinate is the other rank's (a DCP save then has two ranks writing one shard's offset and half a
    tensor missing)."""
    import torch
    from torch.distributed.tensor import DTensor

    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    meta = getattr(propagator, "_propagate_tensor_meta_cached", None)  # absent in some torch versions
    if meta is not None:
        meta.cache_clear()
    fast_path = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if fast_path is not None:
        fast_path()


def _send(conn, message) -> None:
    """Plain pickle, bytes in-band: Connection.send would hand tensors over as shared-memory handles
    (torch registers that reduction), which die with the worker that exits right after."""
    conn.send_bytes(pickle.dumps(message))


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group of a process started by torchrun or a cluster launcher -> (rank, world size).

    Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (env:// rendezvous); the backend defaults to NCCL
    when CUDA is available, else gloo. Already initialised: returns the current rank and size.
    """
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if not dist.is_initialized():
        if missing:
            raise WorkerError(f"not started by torchrun or a cluster launcher: {', '.join(missing)} unset "
                              "(use ltmdsl.distributed.launch for local workers)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
