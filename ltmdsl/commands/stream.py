"""`ltmdsl stream FILE --tokens N [--chunk C] [--batch B] [--json]`: push N synthetic tokens through a model.

The model is built from the spec (seeded random weights) and fed N random tokens per sequence in chunks
of C under `torch.inference_mode`, one cache allocated up front for N tokens. Only the last position's
logits are computed per chunk, so nothing of size N x V is ever materialised, and tokens are drawn chunk
by chunk. Reports tokens, seconds, tokens_per_s (all sequences together), peak_rss_bytes,
cache_bytes_measured (what the cache holds) and cache_bytes_predicted (ltmdsl.memory.cache_bytes).

Before allocating anything, the memory model's inference components for this run (`ltmdsl.memory.report`
at context N, batch B, chunk C in the compute dtype: weights, KV cache, recurrent state, the prefill
workspace of one chunk and the last position's logits) are added up and compared with MemAvailable from
/proc/meminfo: when they would not fit (a global-attention KV cache at a long N, or a chunk whose
activations are too large), the command refuses with exit code 3 and says which part is too large.

`--nproc N` streams on N local workers (gloo; torch's forked launcher) with the model split by tensor
parallelism over them (tp = N, each kind's tp plan, ltmdsl.distributed), and the same command started by
torchrun runs as one rank of that group (tp = WORLD_SIZE). Every rank draws the same tokens; each holds its
own heads' cache, so cache_bytes_measured and cache_bytes_predicted are one rank's (`cache_bytes(tp=N)`), and
the up-front check compares the N local ranks' per-GPU predictions together with MemAvailable. A model that
tensor parallelism cannot split is refused before launch (exit 2), naming the layer and why. `--cp K` makes K
of the N ranks context-parallel (ltmdsl.distributed.cp_inference; tp = N/K): each rank runs C/K tokens of a
chunk and holds 1/K of every attention cache (`cache_bytes(tp=N/K, cp=K)`); K must divide N, C and the
tokens, and a kind without a cp inference form is refused before launch (exit 2).

The results (the summary lines, or one JSON object with --json) go to stdout whether or not it is a
terminal; the progress bar goes to stderr and only when stderr is a terminal.
Exit codes: 0 done, 1 invalid spec, 2 usage error, 3 would not fit in memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from ltmdsl.commands.common import EXIT_BUDGET, EXIT_OK, EXIT_USAGE, load_model
from ltmdsl.evaluate import parse_count
from ltmdsl.units import format_bytes

def count(text: str) -> int:
    """argparse type: a positive count written as in a spec ('4096', '100M', '64Ki', '1e6')."""
    import argparse

    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p) -> None:
    p.add_argument("file", metavar="FILE", help="spec file (.ltm)")
    p.add_argument("--tokens", type=count, required=True, metavar="N", help="tokens per sequence (e.g. 1M)")
    p.add_argument("--chunk", type=count, default=1024, metavar="C", help="tokens per forward call (default 1024)")
    p.add_argument("--batch", type=count, default=1, metavar="B", help="sequences streamed together (default 1)")
    p.add_argument("--model", help="which model of the file (default: the last one)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="compute dtype (default: the spec's)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bar")
    p.add_argument("--nproc", type=count, metavar="N",
                   help="stream on N local workers, the model split over them by tensor parallelism (tp = N); "
                        "under torchrun the group's WORLD_SIZE")
    p.add_argument("--cp", type=count, default=1, metavar="K",
                   help="with --nproc (or torchrun): K of the ranks split the sequence (context parallelism), "
                        "the rest tensor-parallel (tp = N/K)")


def mem_available() -> int | None:
    """Bytes this machine can still give (ltmdsl.tensorfile.available_bytes: MemAvailable); None if unknown."""
    from ltmdsl.tensorfile import available_bytes

    return available_bytes()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def refusal(name: str, N: int, B: int, C: int, need: dict[str, int], avail: int, grows: bool) -> str:
    """Why a run does not fit: every component the memory model predicts, and what to change."""
    parts = " + ".join(f"{format_bytes(v)} {k.replace('_', ' ')}" for k, v in need.items() if v)
    largest = max(need, key=need.get)
    if largest in ("activations", "logits"):
        why = f"the activations of one {C:,}-token chunk are the largest part: pass a smaller --chunk"
    elif largest == "kv_cache" and grows:
        why = "its KV cache grows with the context: stream fewer tokens or use windowed attention"
    else:
        why = f"its {largest.replace('_', ' ')} is the largest part"
    return (f"ltmdsl stream: refusing: {name} at {N:,} tokens x batch {B} in chunks of {C:,} needs {parts} = "
            f"{format_bytes(sum(need.values()))}, but only {format_bytes(avail)} is available ({why}).")


def tp_degree(args) -> int | None:
    """The tensor-parallel degree of this run: --nproc N, or WORLD_SIZE under torchrun; None for one process."""
    from ltmdsl.train.parallel import launched_by_torchrun

    if launched_by_torchrun():
        import os

        return int(os.environ["WORLD_SIZE"])
    return args.nproc


def run(args) -> int:
    _, ir, code = load_model(args.file, args.model, show_warnings=not args.json)
    if ir is None:
        return code
    from ltmdsl.memory import cache_bytes
    from ltmdsl.memory import report as memory_report
    from ltmdsl.units import DTYPES

    dname = args.dtype or ir.dtype.name
    if dname not in ("fp32", "bf16", "fp16"):
        print(f"ltmdsl stream: model {ir.name} stores {dname} weights; pass --dtype bf16", file=sys.stderr)
        return EXIT_USAGE
    tp = tp_degree(args)
    if tp is not None and (args.nproc is not None and args.nproc != tp):
        print(f"ltmdsl stream: error: --nproc {args.nproc} inside a group of WORLD_SIZE={tp} (started by torchrun "
              "or a launcher): drop --nproc", file=sys.stderr)
        return EXIT_USAGE
    cp = args.cp
    world = tp
    if cp > 1:
        error = cp_error(ir, world, cp, args.tokens, min(args.chunk, args.tokens))
        if error:
            print(f"ltmdsl stream: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        tp = world // cp
    if tp is not None and tp > 1:
        from ltmdsl.distributed.tensor_parallel import tp_plans
        from ltmdsl.runtime.kinds import TensorParallelUnsupported

        try:
            tp_plans(ir, tp)
            if ir.vocab % tp:
                raise TensorParallelUnsupported(f"tp = {tp} must divide the vocabulary of {ir.vocab}")
        except TensorParallelUnsupported as e:
            print(f"ltmdsl stream: error: {ir.name} cannot be split over {tp} ranks: {e}", file=sys.stderr)
            return EXIT_USAGE
    dt = DTYPES[dname]
    N, B, C = args.tokens, args.batch, min(args.chunk, args.tokens)
    t = tp or 1
    predicted = cache_bytes(ir, batch=B, context=N, kv_dtype=dt, state_dtype=dt, conv_taps="full", tp=t, cp=cp)
    cache_pred = sum(predicted.values())
    grows = cache_bytes(ir, batch=B, context=2 * N, kv_dtype=dt, state_dtype=dt, tp=t,
                        cp=cp)["kv_cache"] > predicted["kv_cache"]
    plan = {} if world is None else {"tp": t, "cp": cp, "sharding": "plan"}
    r = memory_report(ir, None, context=N, batch=B, chunk=C, gpus=t * cp, weight_dtype=dt, kv_dtype=dt,
                      state_dtype=dt, activation_dtype=dt, conv_taps="full", **plan)
    need = r.components if tp is None else {k: v * (args.nproc or 1) for k, v in r.per_gpu_components.items()}
    avail = mem_available()
    if avail is not None and sum(need.values()) > avail:
        print(refusal(ir.name, N, B, C, need, avail, grows), file=sys.stderr)
        return EXIT_BUDGET

    show = not args.json and sys.stderr.isatty()
    job = (ir, dname, N, B, C, args.seed, show, cp)
    if world is None:
        measured = _stream(*job[:-1])  # one process: no cp
    elif args.nproc is None:  # one rank of a torchrun group
        from ltmdsl.distributed.launch import init_from_env

        rank, _ = init_from_env()
        measured = _stream_rank(*job)
        if rank != 0:
            return EXIT_OK if measured["finite"] else 1
    else:
        from ltmdsl.distributed.launch import launch

        measured = launch(_stream_rank, world, job)[0]
    seconds = measured["seconds"]
    report = {
        "model": ir.name,
        "tokens": N,
        "batch": B,
        "chunk": C,
        "dtype": dname,
        "tp": t,
        "cp": cp,
        "seconds": round(seconds, 6),
        "tokens_per_s": round(N * B / seconds, 3) if seconds > 0 else None,
        "peak_rss_bytes": measured["peak_rss_bytes"],
        "cache_bytes_measured": measured["cache_bytes"],  # one rank's under tp
        "cache_bytes_predicted": cache_pred,
        "cache_grows_with_tokens": grows,
        "weights_bytes": measured["weights_bytes"],
        "memory_predicted_bytes": need,  # what the up-front check compared with MemAvailable
        "last_logits_finite": measured["finite"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        ranks = "" if world is None else f" on {t} tp ranks" if cp == 1 else f" on {t} tp x {cp} cp ranks"
        print(f"{ir.name}: {N:,} tokens x batch {B}{ranks} in {seconds:.2f} s = {report['tokens_per_s']:,.0f} tokens/s")
        per = " per rank" if world is not None else ""
        print(f"  cache {format_bytes(measured['cache_bytes'])}{per} (predicted {format_bytes(cache_pred)}), "
              f"weights {format_bytes(report['weights_bytes'])}{per}, peak RSS {format_bytes(report['peak_rss_bytes'])}")
    sys.stdout.flush()
    return EXIT_OK if measured["finite"] else 1


def cp_error(ir, world: int | None, cp: int, N: int, C: int) -> str | None:
    """Why `--cp cp` cannot stream this model on `world` ranks (None: it can)."""
    from ltmdsl.distributed.cp_inference import refusal, sharded_tokens

    if world is None:
        return "--cp needs --nproc (or a torchrun group)"
    if world % cp:
        return f"--cp {cp} must divide the {world} ranks"
    if N % cp or C % cp:
        return f"--cp {cp} must divide the tokens ({N}) and the chunk ({C}): each rank runs 1/cp of every chunk"
    why = refusal(ir)
    if why is not None:
        return f"{ir.name} cannot run context-parallel inference: {why}"
    for x, held in sharded_tokens(ir, N):
        if held % cp:
            return f"--cp {cp} must divide the {held} cached tokens of layer '{x.definition}'"
    return None


def _stream_rank(ir, dname: str, N: int, B: int, C: int, seed: int, show: bool, cp: int = 1) -> dict:
    """One rank (the process group up): this rank's share of the model (tp = world / cp), served over the cp
    ranks when cp > 1 (ltmdsl.distributed.cp_inference), then `_stream`."""
    import torch.distributed as dist

    from ltmdsl.distributed import parallelize, plan_from
    from ltmdsl.runtime.build import TORCH_DTYPES

    world = dist.get_world_size()
    if cp == 1:
        model = parallelize(ir, plan_from(world=world, tp=world), dtype=TORCH_DTYPES[dname], seed=seed).model
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from ltmdsl.distributed.cp_inference import serve
        from ltmdsl.distributed.materialize import build_meta, materialize
        from ltmdsl.distributed.tensor_parallel import apply_tensor_parallel

        mesh = init_device_mesh("cpu", (cp, world // cp), mesh_dim_names=("cp", "tp"))
        net = build_meta(ir, TORCH_DTYPES[dname])
        if world > cp:
            apply_tensor_parallel(net, mesh["tp"])
        model = serve(materialize(net, "cpu", seed), mesh["cp"])
    return _stream(ir, dname, N, B, C, seed, show and dist.get_rank() == 0, model)


def _stream(ir, dname: str, N: int, B: int, C: int, seed: int, show: bool, model=None) -> dict:
    """Stream N seeded random tokens per sequence in chunks of C through `model` (built from the spec when
    None) under inference_mode: seconds, cache bytes, weight bytes, peak RSS and whether the last logits are
    finite."""
    import torch
    from tqdm import tqdm

    from ltmdsl.runtime.build import TORCH_DTYPES, build

    if model is None:
        model = build(ir, dtype=TORCH_DTYPES[dname], seed=seed)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        cache = model.new_cache(B, N)
        bar = tqdm(total=N, unit="tok", unit_scale=True, disable=not show, file=sys.stderr, desc=ir.name)
        start = time.perf_counter()
        done = 0
        logits = None
        while done < N:
            c = min(C, N - done)
            ids = torch.randint(0, ir.vocab, (B, c), generator=gen)  # [B, c], drawn per chunk (alike on every rank)
            logits = model(ids, cache, output="last")  # [B, 1, V]: the head runs on one position only
            done += c
            bar.update(c)
        seconds = time.perf_counter() - start
        bar.close()
        finite = bool(torch.isfinite(logits).all())
    weights = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in model.parameters())
    return {"seconds": seconds, "cache_bytes": cache.nbytes(), "weights_bytes": weights, "peak_rss_bytes": peak_rss(),
            "finite": finite}
