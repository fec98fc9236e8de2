"""`ltmdsl memory FILE... [options]`: how much memory a model needs, on how many GPUs, and why.

Prints, per spec, a table of components (one replica and the most loaded GPU, in GiB = 2^30 B and
GB = 10^9 B, each labelled as what it is) with the formula of each component in T, B and C, then the
verdict, the GPU count, the largest context and batch that fit, the dominant component and the FLOPs
per decoded token. `--json` prints MemoryReport.to_json() (a list for several files); `--plot` draws
bytes against context for every spec side by side. Without --budget the model's first budget is used,
else the defaults of ltmdsl.memory.settings (inference, T = 128Ki, B = 1, H100 count derived).

`--measure` runs the budget's step at full size on fake tensors (ltmdsl.measure: imports torch, nothing is
allocated) and prints, per component, the predicted bytes, the traced bytes and their relative difference,
plus the traced peak and the phase in which it happens; with --json the keys `predicted` and `measured`
({component: bytes}) and `peak_bytes`. `--measure --device cuda` runs the same step for real on the GPU
(one-GPU plans) and adds the CUDA allocator's peak (`torch.cuda.max_memory_allocated`,
`allocated_peak_bytes`). Without --measure torch is never imported.

Exit codes, as `ltmdsl check`'s: 0 the report says it fits, 1 invalid spec, 2 usage error (unknown budget,
GPU, bad number), 3 the report is printed but a `require` line fails or the most loaded GPU is over its
capacity (for several files: the worst), or (--measure) the model cannot be traced (a kind without a
fake-tensor path, an untraced plan, a step too large to trace).
"""

from __future__ import annotations

import json
import sys

from ltmdsl.evaluate import parse_count

def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="spec file(s); several are plotted side by side")
    p.add_argument("--budget", help="evaluate this budget (default: the model's first budget, if any)")
    p.add_argument("--mode", choices=("inference", "training"), help="override the budget's mode")
    p.add_argument("--context", help="context T, with the spec's suffixes (100M, 128Ki)")
    p.add_argument("--batch", help="batch B (sequences)")
    p.add_argument("--gpu", help="GPU kind: H100 (default), H200, A100_80GB, A100_40GB, B200 or one the spec defines")
    p.add_argument("--gpus", help="number of GPUs (default: the budget's, else derived)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a log-log plot of bytes against context")
    p.add_argument("--measure", action="store_true",
                   help="trace the budget's step on fake tensors and compare with the prediction (imports torch)")
    p.add_argument("--device", metavar="DEV",
                   help="with --measure: run the step for real on this device (cuda, cuda:1) instead of fake tensors, "
                        "and report the CUDA allocator's peak")


def _error(where: str, message: str) -> int:
    print(f"{where}: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    from ltmdsl.commands.common import EXIT_BUDGET, EXIT_OK, load_or_report

    overrides = {}
    try:
        for name in ("context", "batch", "gpus"):
            value = getattr(args, name, None)
            if value is not None:
                overrides[name] = parse_count(value)
    except ValueError as e:
        return _error("ltmdsl memory", str(e))
    if args.mode:
        overrides["mode"] = args.mode
    device = getattr(args, "device", None)
    if device is not None and not getattr(args, "measure", False):
        return _error("ltmdsl memory", "--device runs the measured step on a device: give --measure too")
    if args.plot:  # refuse before any work when the 'plot' extra is missing (the CLI names it)
        import matplotlib  # noqa: F401
    from ltmdsl.memory import report  # sympy only once the arguments are known to be sane

    reports = []
    for path in args.files:
        spec, code = load_or_report(path, show_warnings=not args.json)
        if spec is None:
            return code
        model = spec.model
        budget = None
        if args.budget:
            matches = [b for b in spec.budgets if b.name == args.budget]
            if not matches:
                known = ", ".join(b.name for b in spec.budgets) or "none"
                return _error(path, f"no budget named {args.budget!r} (budgets: {known})")
            budget = matches[0]
            model = spec.ir.model(budget.model)
        else:
            own = spec.ir.budgets_for(model.name)
            budget = own[0] if own else None
        extra = dict(overrides)
        if args.gpu:
            extra["gpu"] = args.gpu
        if getattr(args, "measure", False):
            code = _measure(path, spec, model, budget, extra, args.json, device)
            if code:
                return code
            continue
        try:
            reports.append(report(model, budget, user_gpus={g.name: g for g in spec.ir.gpus}, **extra))
        except ValueError as e:
            return _error(path, str(e))
    if getattr(args, "measure", False):
        return EXIT_OK
    if args.plot:
        from ltmdsl.memory.plot import plot_reports

        try:
            plot_reports(reports, args.plot)
        except OSError as e:
            return _error(args.plot, f"cannot write the plot: {e.strerror or e}")
    if args.json:
        data = [r.to_json() for r in reports]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
    else:
        print("\n\n".join(r.to_text() for r in reports))
        if args.plot:
            print(f"\nwrote {args.plot}")
    return EXIT_OK if all(r.fits for r in reports) else EXIT_BUDGET


def _measure(path, spec, model, budget, overrides: dict, as_json: bool, device: str | None = None) -> int:
    """`--measure`: trace and print one spec's comparison (module docstring); 0, or the exit code of a refusal."""
    from ltmdsl.measure import NotTraceable, TooLargeToTrace, measure

    if device is not None:
        import torch

        try:
            where = torch.device(device)
        except RuntimeError as e:
            return _error("ltmdsl memory", f"--device {device!r}: {e}")
        if where.type == "cuda" and not torch.cuda.is_available():
            return _error("ltmdsl memory", f"--device {device}: no CUDA device here; leave --device out to trace on "
                          "fake tensors")
    try:
        m = measure(model, budget, user_gpus={g.name: g for g in spec.ir.gpus}, device=device,
                    progress=not as_json, **overrides)  # the counter: on a terminal, without --json
    except (NotTraceable, TooLargeToTrace) as e:
        print(f"{path}: error: {e}", file=sys.stderr)
        return 3
    except ValueError as e:
        return _error(path, str(e))
    print(json.dumps(m.to_json(), indent=2) if as_json else m.to_text())
    return 0
