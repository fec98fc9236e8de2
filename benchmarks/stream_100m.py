"""Time `ltmdsl stream` on the constant-memory example at growing token counts, each in a fresh process.

By default N = 64Ki, 256Ki and 1M tokens (a few seconds to a minute on 2 CPU cores); `--tokens 100M`
runs the headline count (about 15-30 minutes on the CPU at the throughput this prints). For each N it
prints tokens/s, peak RSS and the cache bytes (measured = predicted), so flat memory is visible, and it
extrapolates the time for 100M tokens from the largest run.

    python benchmarks/stream_100m.py [--spec examples/stream-hybrid.ltm] [--tokens 64Ki 1M] [--chunk 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stream(spec: str, tokens: str, chunk: str, batch: str) -> dict:
    cmd = [sys.executable, "-m", "ltmdsl.cli", "stream", spec, "--tokens", tokens, "--chunk", chunk,
           "--batch", batch, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stream failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "examples" / "stream-hybrid.ltm"))
    ap.add_argument("--tokens", nargs="+", default=["64Ki", "256Ki", "1M"], help="token counts (e.g. 100M)")
    ap.add_argument("--chunk", default="4096")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [stream(args.spec, n, args.chunk, args.batch) for n in args.tokens]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{Path(args.spec).name}, chunk {args.chunk}, batch {args.batch}")
    print(f"{'tokens':>12} {'seconds':>9} {'tokens/s':>10} {'peak RSS MiB':>13} {'cache B':>9} {'predicted B':>12}")
    for r in rows:
        print(f"{r['tokens']:>12,} {r['seconds']:>9.2f} {r['tokens_per_s']:>10,.0f} {r['peak_rss_bytes'] / 2**20:>13.1f} "
              f"{r['cache_bytes_measured']:>9,} {r['cache_bytes_predicted']:>12,}")
    last = rows[-1]
    if last["tokens"] < 10**8:
        print(f"extrapolated 100M tokens: {10**8 / last['tokens_per_s'] / 60:.1f} min at {last['tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
    main()
