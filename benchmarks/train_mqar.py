"""MQAR (Zoology): how many seconds of training until the tiny hybrid reaches 0.99 exact match?

Trains SPEC with the library's training loop (`ltmdsl.train.train`, what `ltmdsl train` runs: AdamW with
its decay groups, warmup + cosine, clipping, the answer-only loss) on MQAR at context 64, 4 key-value
pairs, vocab 256, seed 0. Every --eval-every steps it scores --eval-samples held-out samples (the
evaluation seed, never trained on) teacher forced in one batched pass (ltmdsl.train.heldout) and stops
at the first step where that exact match reaches --target, with a checkpoint. The clocks count training
only (the held-out checks are left out of both): wall seconds, and CPU seconds of this process (all its
threads). Then `ltmdsl eval` scores the stopped checkpoint as a user would, decoding every answer greedily
through the cache, at context 64 (trained) and 256 (4x). Prints the numbers as JSON; writes the
`train_mqar` section of benchmarks/RESULTS.md (with the machine's load) unless --no-write.

    python benchmarks/train_mqar.py [--spec examples/ltm-tiny.ltm] [--threads 2] [--batch 32] [--lr 3e-3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import ltmdsl
from ltmdsl.evals import get_task
from ltmdsl.train.loop import TrainConfig, train
from ltmdsl.train.data import EVAL_SEED
from ltmdsl.train.heldout import teacher_forced_exact_match
from train_report import cli_eval, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"context": 64, "num_kv_pairs": 4, "vocab_size": 256}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples" / "ltm-tiny.ltm"))
    p.add_argument("--steps", type=int, default=700, help="most steps (the schedule's length)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=500, help="held-out samples of the stopping check")
    p.add_argument("--samples", type=int, default=500, help="samples of the final `ltmdsl eval`")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: the CI machine's 2 cores)")
    p.add_argument("--budget-s", type=float, default=60.0, help="training seconds the target allows")
    p.add_argument("--out", help="run folder to keep (default: a temporary one)")
    p.add_argument("--plot", help="copy the run's training plot (loss, answer accuracy) to this PNG")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = ltmdsl.load(args.spec)
    ir = spec.ir.model()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "mqar"
    config = TrainConfig(task="mqar", out=str(out), steps=args.steps, batch=args.batch, options=dict(OPTIONS),
                         lr=args.lr, warmup=args.warmup, seed=args.seed)
    task = get_task("mqar")
    options = task.make_options(**OPTIONS)
    checks: list[tuple[int, float]] = []  # (step, held-out exact match)
    paused_cpu = [0.0]  # CPU seconds spent in the held-out checks

    def reached(model, record) -> bool:
        if record["step"] % args.eval_every:
            return False
        cpu = time.process_time()
        em = teacher_forced_exact_match(model, task, options, EVAL_SEED, args.eval_samples)
        paused_cpu[0] += time.process_time() - cpu
        checks.append((record["step"], em))
        print(f"step {record['step']}: loss {record['loss']:.3f}, held-out exact match {em:.3f}, "
              f"{record['seconds']:.1f} s of training", flush=True)
        return em >= args.target

    cpu0 = time.process_time()
    records = list(train(ir, config, until=reached))
    cpu_s = time.process_time() - cpu0 - paused_cpu[0]
    last = records[-1]
    hit = bool(checks) and checks[-1][1] >= args.target
    cache = cli_eval(out, ["--context", "64", "256"], args.samples, args.threads)
    spec_path = Path(args.spec).resolve()
    report = {"spec": str(spec_path.relative_to(ROOT)) if spec_path.is_relative_to(ROOT) else args.spec,
              "model": ir.name, "params": ir.params_total, "batch": args.batch, "lr": args.lr,
              "warmup": args.warmup, "seed": args.seed, "threads": args.threads, "target": args.target,
              "reached": hit, "steps": last["step"], "train_wall_s": round(last["seconds"], 1),
              "train_cpu_s": round(cpu_s, 1), "held_out_exact_match": checks[-1][1] if checks else None,
              "cache_exact_match": {str(k): v for k, v in cache.items()}, "machine": machine(args.threads)}
    print(json.dumps(report, indent=2))
    if args.plot:
        shutil.copyfile(out / "training.png", args.plot)
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    if args.no_write:
        return
    reached_ok = hit and cache[64] >= args.target

    def verdict(seconds: float) -> str:
        return "MET" if reached_ok and seconds <= args.budget_s else "NOT MET"

    cpu_note = (f"; {verdict(cpu_s)} in CPU time ({cpu_s:.1f} s: one thread's CPU seconds are about its wall time on "
                "an unshared machine, the comparable number on a shared one)" if args.threads == 1 else
                f" ({cpu_s:.1f} s of CPU over the {args.threads} threads)")
    cmd = (f"python benchmarks/train_mqar.py --spec {report['spec']} --steps {args.steps} --batch {args.batch} "
           f"--lr {args.lr} --warmup {args.warmup} --threads {args.threads}")
    body = f"""### {datetime.date.today()}: MQAR, seconds of training to {args.target} exact match (`{cmd}`)

{ir.name} ({ir.params_total:,} parameters, `{report['spec']}`), MQAR context 64, 4 key-value pairs,
vocab 256, seed {args.seed}; AdamW steps of {args.batch} samples (lr {args.lr}, warmup {args.warmup}, cosine over
{args.steps} steps, decay 0.1), a teacher-forced held-out check of {args.eval_samples} samples every
{args.eval_every} steps, stopping at the first that reaches {args.target}.
{'Reached' if hit else 'Not reached'} at step {last['step']}: {last['seconds']:.1f} s of training wall time,
{cpu_s:.1f} s of CPU time (the checks left out of both). `ltmdsl eval` on that checkpoint, {args.samples}
samples decoded through the cache: {cache[64]:.3f} exact match at context 64 and {cache[256]:.3f} at 256 (4x).
Machine: {machine(args.threads)}.
Target (>= {args.target} at context 64 within {args.budget_s:.0f} s of training): {verdict(last["seconds"])} in this
run's wall time ({last['seconds']:.1f} s with {args.threads} torch thread(s), at the load above){cpu_note}.
"""
    write_section("train_mqar", body)


if __name__ == "__main__":
    main()
