"""Cold-start latency of the commands that must answer in well under a second (no torch, no triton).

    python benchmarks/cli_latency.py [--repeat 5] [--examples]

Runs each command in a fresh interpreter, as a user would, and prints the best and median wall time and
the best CPU time (user + system of the child: what a loaded machine does not inflate), with
`python -c pass` measured in the same run as the baseline. `--examples` adds `check` and `memory` of every
spec in examples/, as the slowest of them is what a user of the examples waits for.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "ltmdsl.cli"]
COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "check llama-3.1-405b": CLI + ["check", "examples/llama-3.1-405b.ltm"],
    "check --no-budgets llama-3.1-405b": CLI + ["check", "--no-budgets", "examples/llama-3.1-405b.ltm"],
    "show jamba-v0.1": CLI + ["show", "examples/jamba-v0.1.ltm"],
    "memory ltm-100m": CLI + ["memory", "examples/ltm-100m.ltm"],
    "memory tiny-hybrid (every kind)": CLI + ["memory", "examples/tiny-hybrid.ltm"],
    "memory llama-3.1-405b --json": CLI + ["memory", "--json", "examples/llama-3.1-405b.ltm"],
}


def example_commands() -> dict[str, list[str]]:
    """`check` and `memory` of every example spec."""
    out = {}
    for path in sorted((ROOT / "examples").glob("*.ltm")):
        rel = str(path.relative_to(ROOT))
        out[f"check {path.stem}"] = CLI + ["check", rel]
        out[f"memory {path.stem}"] = CLI + ["memory", rel]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--examples", action="store_true", help="also check and memory of every example")
    args = ap.parse_args()
    commands = {**COMMANDS, **(example_commands() if args.examples else {})}
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for name, cmd in commands.items():
        for _ in range(args.repeat):
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            times.setdefault(name, []).append(time.perf_counter() - start)
            now = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.setdefault(name, []).append(now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime)
    base = min(times["python -c pass (baseline)"])
    print(f"{'command':40s} {'best s':>8s} {'median s':>9s} {'best - baseline':>16s} {'best CPU s':>11s}")
    for name, ts in times.items():
        print(f"{name:40s} {min(ts):8.3f} {statistics.median(ts):9.3f} {min(ts) - base:16.3f} {min(cpu[name]):11.3f}")
    if args.examples:
        for verb in ("check", "memory"):
            worst = max((n for n in cpu if n.startswith(verb + " ") and n.split()[-1] in
                         {p.stem for p in (ROOT / "examples").glob("*.ltm")}), key=lambda n: min(cpu[n]))
            print(f"slowest example {verb}: {worst.split(' ', 1)[1]}, best CPU {min(cpu[worst]):.3f} s")


if __name__ == "__main__":
    main()
