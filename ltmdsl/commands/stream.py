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
    dt = DTYPES[dname]
    N, B, C = args.tokens, args.batch, min(args.chunk, args.tokens)
    predicted = cache_bytes(ir, batch=B, context=N, kv_dtype=dt, state_dtype=dt, conv_taps="full")
    cache_pred = sum(predicted.values())
    grows = cache_bytes(ir, batch=B, context=2 * N, kv_dtype=dt, state_dtype=dt)["kv_cache"] > predicted["kv_cache"]
    need = memory_report(ir, None, context=N, batch=B, chunk=C, gpus=1, weight_dtype=dt, kv_dtype=dt,
                         state_dtype=dt, activation_dtype=dt, conv_taps="full").components
    avail = mem_available()
    if avail is not None and sum(need.values()) > avail:
        print(refusal(ir.name, N, B, C, need, avail, grows), file=sys.stderr)
        return EXIT_BUDGET

    import torch
    from tqdm import tqdm

    from ltmdsl.runtime.build import TORCH_DTYPES, build

    model = build(ir, dtype=TORCH_DTYPES[dname], seed=args.seed).eval()
    gen = torch.Generator().manual_seed(args.seed)
    show = not args.json and sys.stderr.isatty()
    with torch.inference_mode():
        cache = model.new_cache(B, N)
        bar = tqdm(total=N, unit="tok", unit_scale=True, disable=not show, file=sys.stderr, desc=ir.name)
        start = time.perf_counter()
        done = 0
        logits = None
        while done < N:
            c = min(C, N - done)
            ids = torch.randint(0, ir.vocab, (B, c), generator=gen)  # [B, c], drawn per chunk
            logits = model(ids, cache, output="last")  # [B, 1, V]: the head runs on one position only
            done += c
            bar.update(c)
        seconds = time.perf_counter() - start
        bar.close()
        finite = bool(torch.isfinite(logits).all())
    report = {
        "model": ir.name,
        "tokens": N,
        "batch": B,
        "chunk": C,
        "dtype": dname,
        "seconds": round(seconds, 6),
        "tokens_per_s": round(N * B / seconds, 3) if seconds > 0 else None,
        "peak_rss_bytes": peak_rss(),
        "cache_bytes_measured": cache.nbytes(),
        "cache_bytes_predicted": cache_pred,
        "cache_grows_with_tokens": grows,
        "weights_bytes": model.parameter_bytes(),
        "memory_predicted_bytes": need,  # what the up-front check compared with MemAvailable
        "last_logits_finite": finite,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{ir.name}: {N:,} tokens x batch {B} in {seconds:.2f} s = {report['tokens_per_s']:,.0f} tokens/s")
        print(f"  cache {format_bytes(cache.nbytes())} (predicted {format_bytes(cache_pred)}), "
              f"weights {format_bytes(report['weights_bytes'])}, peak RSS {format_bytes(report['peak_rss_bytes'])}")
    sys.stdout.flush()
    return EXIT_OK if finite else 1
