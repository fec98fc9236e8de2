"""NCCL sanity of `ltmdsl train --nproc`: on a GPU, the same run in one process and on a 1-rank NCCL group.

    python benchmarks/nccl_check.py [--steps 5]      # run by benchmarks/gpu_check.sh after the kernels

Both runs train examples/ltm-tiny.ltm on MQAR on the GPU; the NCCL run goes through everything a
multi-GPU run does (process group, meta build, FSDP2 zero 3 over the 1-rank mesh, DCP checkpoint and
export) except the cross-GPU traffic, and its losses must equal the single-process ones within 1e-4
relative (the kernels may reduce in another order). Prints one line per step and PASS / FAIL; exit 1 on
FAIL. Without CUDA it says so and exits 0 (nothing to check).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("nccl_check: no CUDA device; nothing to check")
        return 0
    import ltmdsl
    from ltmdsl.distributed.plan import plan_from
    from ltmdsl.train import metrics, parallel
    from ltmdsl.train.loop import TrainConfig, train

    ir = ltmdsl.load(ROOT / "examples" / "ltm-tiny.ltm").ir.model()
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(task="mqar", options={"context": 64}, steps=args.steps, batch=8, device="cuda")
        # NCCL ranks are spawned (ltmdsl.distributed.launch): this process has touched CUDA already.
        parallel.run(ir, TrainConfig(out=f"{tmp}/nccl", **config), plan_from(world=1, zero=3), nproc=1,
                     timeout_s=300)
        one = [r["loss"] for r in train(ir, TrainConfig(out=f"{tmp}/one", **config))]
        group = [r["loss"] for r in metrics.read(Path(tmp) / "nccl" / metrics.METRICS)]
    worst = 0.0
    for step, (a, b) in enumerate(zip(one, group), 1):
        err = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, err)
        print(f"nccl_check: step {step}: one process {a:.6f}, 1-rank NCCL group {b:.6f}, rel {err:.2e}")
    ok = len(group) == len(one) and worst <= 1e-4
    print(f"nccl_check: {'PASS' if ok else 'FAIL'} ({torch.cuda.get_device_name()}, worst rel {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
