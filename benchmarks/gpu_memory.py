"""Predicted against allocated on a GPU: each budget's step run for real, with `torch.cuda.max_memory_allocated`.

    python benchmarks/gpu_memory.py [--time-limit 150] [--only hybrid_1b] [--no-examples]   (by gpu_check.sh)

`ltmdsl memory --measure` traces a budget's step on fake tensors; this runs the same step
(`ltmdsl.measure.measure(..., device="cuda")`: the same modules, inputs, optimizer states and phases, on real
uninitialised tensors) on the GPU and reports, per case, the memory model's per-GPU total beside two
measured peaks: the tracked one (MemTracker over the real step's storages, what the fake trace reports) and
the CUDA caching allocator's own (`max_memory_allocated` over the step, which also holds cuBLAS's workspace
and the allocator's 512-byte rounding). Cases: the training budgets of benchmarks/hybrid-1b.ltm (a 1.3B
Mamba-2 / attention hybrid at 8K tokens: no recompute, selective and full, flash and eager attention) and
its 256K serving budget, some examples' training steps at 4K that fit one GPU, then every example's
one-GPU inference budget that the memory model says fits in 90% of this GPU, until the time limit.
Writes a Markdown table to stdout and, when $OUT is set, to $OUT/gpu_memory.txt (and every Measurement to
$OUT/gpu_memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (spec path relative to the repository, budget or None, overrides, label)
TRAINING = [
    ("benchmarks/hybrid-1b.ltm", "train_8k", {}, "hybrid-1b train 8K none (flash)"),
    ("benchmarks/hybrid-1b.ltm", "train_8k_selective_eager", {}, "hybrid-1b train 8K selective, eager"),
    ("benchmarks/hybrid-1b.ltm", "train_8k_full", {}, "hybrid-1b train 8K full, batch 2"),
    ("benchmarks/hybrid-1b.ltm", "train_8k_eager", {}, "hybrid-1b train 8K none, eager"),
    ("benchmarks/hybrid-1b.ltm", "serve_256k", {}, "hybrid-1b serve 256K"),
    ("examples/lfm2-700m.ltm", None, dict(mode="training", context=4096, recompute="none"), "lfm2-700m train 4K none"),
    ("examples/recurrentgemma-2b.ltm", None, dict(mode="training", context=4096, recompute="none"),
     "recurrentgemma-2b train 4K none"),
    ("examples/gdn-hybrid.ltm", None, dict(mode="training", context=4096, recompute="none"), "gdn-hybrid train 4K none"),
]


def say(line: str = "") -> None:
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_memory.txt"), "a") as f:
            f.write(line + "\n")


def example_inference_cases(capacity: int) -> list:
    """Every example's inference budget on one GPU whose predicted per-GPU total fits in 90% of `capacity`."""
    import ltmdsl
    from ltmdsl.memory import report

    out = []
    for path in sorted((ROOT / "examples").glob("*.ltm")):
        spec = ltmdsl.load(path)
        for b in spec.budgets:
            try:
                r = report(spec.ir.model(b.model), b, user_gpus={g.name: g for g in spec.ir.gpus}, sharding="plan")
            except ValueError:
                continue
            s = r.settings
            if s.mode == "inference" and s.parallel.world == 1 and r.per_gpu_bytes <= 0.9 * capacity:
                out.append((f"examples/{path.name}", b.name, {}, f"{path.stem} {b.name}"))
    return out


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def run_case(spec_path: str, budget_name, overrides: dict, device: str):
    import ltmdsl
    from ltmdsl.measure import measure

    spec = ltmdsl.load(ROOT / spec_path)
    budget = None
    model = spec.model
    if budget_name is not None:
        budget = next(b for b in spec.budgets if b.name == budget_name)
        model = spec.ir.model(budget.model)
    return measure(model, budget, user_gpus={g.name: g for g in spec.ir.gpus}, device=device, **overrides)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--time-limit", type=float, default=150.0, help="start no case after this many seconds")
    ap.add_argument("--only", nargs="*", help="labels containing any of these words")
    ap.add_argument("--no-examples", action="store_true", help="skip the examples' inference budgets")
    args = ap.parse_args(argv)
    import torch

    from ltmdsl.units import format_bytes

    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        say("gpu_memory: no CUDA device here; nothing to measure")
        return 2
    capacity = torch.cuda.get_device_properties(args.device).total_memory if cuda else 64 << 30
    name = torch.cuda.get_device_name(args.device) if cuda else args.device
    say(f"gpu_memory: {name}, {format_bytes(capacity)}, torch {torch.__version__}")
    cases = list(TRAINING)
    if not args.no_examples:
        cases += example_inference_cases(capacity)
    if args.only:
        cases = [c for c in cases if any(w in c[3] for w in args.only)]
    say("| case | predicted per-GPU | tracked peak | vs predicted | allocator peak | vs predicted | "
        "activations pred / tracked | states: tracked - predicted | s |")
    say("|---|---|---|---|---|---|---|---|---|")
    t0, records, status = time.time(), [], 0
    for spec_path, budget, overrides, label in cases:
        if time.time() - t0 > args.time_limit:
            say(f"(time limit: {len(cases) - len(records)} cases not run, from {label})")
            break
        try:
            m = run_case(spec_path, budget, overrides, args.device)
        except Exception as exc:  # keep going: the table says what broke
            say(f"| {label} | error: {type(exc).__name__}: {str(exc)[:200]} | | | | | | | |")
            traceback.print_exc()
            records.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            status = 1
            continue
        finally:
            if cuda:
                torch.cuda.empty_cache()
        states = [c for c in ("weights", "gradients", "optimizer", "kv_cache", "recurrent_state") if c in m.predicted]
        # on CUDA MemTracker counts each storage in the caching allocator's 512-byte blocks, so the states are
        # "exact" to that rounding: a few KiB over ~300 parameter tensors
        diff = sum(m.measured.get(c, 0) - m.predicted[c] for c in states)
        act = f"{format_bytes(m.predicted.get('activations', 0))} / {format_bytes(m.measured.get('activations', 0))}"
        alloc = m.allocated_peak
        say(f"| {label} | {format_bytes(m.predicted_per_gpu)} | {format_bytes(m.peak_bytes)} | {pct(m.peak_relative)} | "
            f"{format_bytes(alloc) if alloc is not None else 'n/a'} | "
            f"{pct(None if alloc is None else (alloc - m.predicted_per_gpu) / m.predicted_per_gpu)} | {act} | "
            f"{diff:+,} B | {m.seconds:.1f} |")
        records.append({"label": label, **m.to_json()})
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_memory.json"), "w") as f:
            json.dump(records, f, indent=1)
    say(f"gpu_memory: {len(records)} cases in {time.time() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
