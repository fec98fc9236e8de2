"""Timing of the memory model: report + 100-point context sweep on the largest example and on a
1,000-layer hybrid spec. Run: python benchmarks/memory_sweep.py (prints wall-clock seconds).

Targets (issue 3): `ltmdsl memory` on the largest example under 1 s cold including the sweep; a
1,000-sub-layer spec under 2 s. Cold process times are measured with a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LARGEST = ROOT / "examples" / "llama-3.1-405b.ltm"

THOUSAND = """model deep {
    vocab = 65536
    d_model = 2048
    dtype = bf16
    layer ssm = mamba2(d_state = 128, head_dim = 64, expand = 2)
    layer swa = attention(heads = 16, kv_heads = 4, window = 4Ki)
    layer full = attention(heads = 16, kv_heads = 1, head_dim = 128)
    layer ffn = mlp(d_ff = 8192, act = swiglu)
    stack {
        repeat 100 { ssm ffn ssm ffn swa ffn ssm ffn full ffn }
    }
}
"""

IN_PROCESS = """
import sys, time
t0 = time.perf_counter()
import ltmdsl
from ltmdsl.memory import report
from ltmdsl.memory.plot import sweep_contexts
spec = ltmdsl.load(sys.argv[1])
t1 = time.perf_counter()
r = report(spec.model, spec.budgets[0] if spec.budgets else None)
t2 = time.perf_counter()
data = r.sweep(sweep_contexts())
t3 = time.perf_counter()
print(f"  imports+load {t1 - t0:.3f} s, report {t2 - t1:.3f} s, 100-point sweep {t3 - t2:.4f} s, "
      f"{len(spec.model.layers)} sub-layers")
"""


def cold(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        deep = Path(tmp) / "deep.ltm"
        deep.write_text(THOUSAND)
        for label, path in (("largest example", LARGEST), ("1,000 sub-layers", deep)):
            print(f"{label}: {path.name}")
            out = subprocess.run([sys.executable, "-c", IN_PROCESS, str(path)], check=True,
                                 capture_output=True, text=True).stdout
            print(out.rstrip())
            cli = [sys.executable, "-m", "ltmdsl.cli", "memory", str(path)]
            times = sorted(cold(cli) for _ in range(3))
            print(f"  cold `ltmdsl memory` (median of 3): {times[1]:.3f} s")
            times = sorted(cold(cli + ["--json", "--context", "100M"]) for _ in range(3))
            print(f"  cold `ltmdsl memory --json --context 100M` (median of 3): {times[1]:.3f} s")


if __name__ == "__main__":
    main()
