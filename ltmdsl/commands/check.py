"""`ltmdsl check FILE...`: is each spec a valid model, what does it contain, do its budgets hold?"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from ltmdsl.commands.common import EXIT_BUDGET, EXIT_OK, load_or_report
from ltmdsl.errors import source_line
from ltmdsl.units import format_count


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="spec files (.ltm)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file on stdout")
    p.add_argument("--no-budgets", action="store_true", help="validate only; do not evaluate budgets")


def run(args) -> int:
    worst = EXIT_OK
    reports = []
    for path in args.files:
        spec, code = load_or_report(path, show_warnings=not args.json)
        if spec is None:
            worst = max(worst, code)
            reports.append({"file": path, "ok": False, "exit": code})
            continue
        results = []
        if spec.budgets and not args.no_budgets:
            from ltmdsl.memory import check_budgets  # sympy stays out of validation-only runs

            results = check_budgets(spec.ir)
        failed = [r for r in results if not r.ok]
        code = EXIT_BUDGET if failed else EXIT_OK
        worst = max(worst, code)
        if args.json:
            reports.append({
                "file": path, "ok": not failed, "exit": code,
                "models": [{"name": m.name, "sublayers": len(m.layers), "params_total": m.params_total,
                            "params_active": m.params_active, **({"params_mtp": m.params_mtp} if m.mtp else {})}
                           for m in spec.models],
                "budgets": [r.to_json() for r in results],
                "warnings": [w.to_json() for w in spec.warnings],
            })
            continue
        for m in spec.models:
            kinds: dict[str, int] = {}
            for layer in m.layers:
                kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
            mix = ", ".join(f"{n} {k}" for k, n in kinds.items())
            print(f"{path}: ok: model {m.name}: {len(m.layers)} sub-layers ({mix}), "
                  f"{format_count(m.params_total)} parameters ({m.params_total:,})")
            if m.mtp is not None:  # on its own line: the total is the main model's (transformers' count)
                print(f"{path}: ok: model {m.name}: multi-token prediction (depth {m.mtp.depth}): "
                      f"{format_count(m.params_mtp)} parameters ({m.params_mtp:,}) besides the total")
        for r in results:
            if r.ok:
                print(r.message)
            for d in r.diagnostics:  # each failure once, with its line and a caret
                print(replace(d, source_line=source_line(spec.text, d.line)).render(), file=sys.stderr)
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return worst
