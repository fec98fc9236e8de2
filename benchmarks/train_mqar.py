"""MQAR (Zoology) on the tiny hybrid: does ltm-tiny reach 0.99 exact match within 60 s of CPU training?

Trains examples/ltm-tiny.ltm (ltm-100m's layer pattern, scaled down) on MQAR with a 64-token context,
4 key-value pairs and vocab 256 for --steps AdamW steps (batch --batch), then scores exact match through
the cache (prefill + greedy decode) on --samples evaluation samples, at the trained context and at 4x.
Prints the numbers and writes them to the `train_mqar` section of benchmarks/RESULTS.md with the
machine's load: wall time depends on what else runs, process CPU time much less.

    python benchmarks/train_mqar.py [--steps 400] [--batch 32] [--lr 3e-3] [--threads 1] [--out runs/mqar]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
from pathlib import Path

import torch

import ltmdsl
from ltmdsl.evals import get_task
from ltmdsl.train.data import EVAL_SEED
from ltmdsl.train.loop import TrainConfig, train
from ltmdsl.train.scoring import score
from train_report import machine, timed_training, write_section

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"context": 64, "num_kv_pairs": 4, "vocab_size": 256}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples" / "ltm-tiny.ltm"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="run folder to keep (default: a temporary one)")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = ltmdsl.load(args.spec)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "mqar"
    config = TrainConfig(task="mqar", out=str(out), steps=args.steps, batch=args.batch, options=OPTIONS,
                         lr=args.lr, warmup=args.warmup)
    records, wall, cpu = timed_training(train(spec.model, config))
    model = ltmdsl.load_checkpoint(out / "checkpoints" / f"step-{args.steps:08d}" / "model.safetensors")
    task = get_task("mqar")
    results = {}
    for context in (64, 256):
        options = task.make_options(**dict(OPTIONS, context=context))
        results[context] = score(model, task, options, EVAL_SEED, args.samples).accuracy
    report = {"model": spec.model.name, "params": spec.model.params_total, "steps": args.steps,
              "batch": args.batch, "lr": args.lr, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
              "final_loss": records[-1]["loss"], "accuracy_64": results[64], "accuracy_256": results[256],
              "samples": args.samples, "machine": machine()}
    print(json.dumps(report, indent=2))
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    if args.no_write:
        return
    met = "MET" if results[64] >= 0.99 and wall <= 60 else "NOT MET"
    body = f"""### {datetime.date.today()}: MQAR on the tiny hybrid (`python benchmarks/train_mqar.py --steps {args.steps} --batch {args.batch} --lr {args.lr}`)

{spec.model.name} ({spec.model.params_total:,} parameters), MQAR context 64, 4 key-value pairs, vocab 256;
{args.steps} AdamW steps of {args.batch} samples in {wall:.1f} s wall, {cpu:.1f} s of process CPU time.
Machine: {machine()}.

| eval context | exact-match accuracy ({args.samples} samples, greedy decode through the cache) |
|---|---|
| 64 (trained) | {results[64]:.3f} |
| 256 (4x) | {results[256]:.3f} |

Target (>= 0.99 at context 64 within 60 s of training): {met}.
"""
    write_section("train_mqar", body)


if __name__ == "__main__":
    main()
