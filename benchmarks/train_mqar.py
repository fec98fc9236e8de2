"""MQAR (Zoology) through the command line: does the tiny hybrid reach 0.99 exact match within 60 s of training?

Runs exactly what a user would: `ltmdsl train SPEC --task mqar --context 64 --num-kv-pairs 4 --vocab-size 256
...` (a checkpoint every --save-every steps), then `ltmdsl eval` on the checkpoint last written within the
--budget-s seconds of training (the run's own clock in metrics.jsonl) and on the final one, at the trained
context and at 4x, exact match of every answer decoded greedily through the cache. Prints steps/s, the step
reached within the budget and the accuracies; writes the `train_mqar` section of benchmarks/RESULTS.md (with
the machine's load: on a shared machine wall time is inflated, steps/s and the step reached say by how much)
and, with --plot, copies the run's loss/accuracy plot there.

    python benchmarks/train_mqar.py [--spec examples/ltm-tiny.ltm] [--steps 600] [--batch 16] [--lr 3e-3]
                                    [--warmup 30] [--threads 2] [--budget-s 60] [--plot docs/train-mqar.png]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
from pathlib import Path

from train_report import cli_eval, cli_train, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"context": 64, "num_kv_pairs": 4, "vocab_size": 256}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples" / "ltm-tiny.ltm"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=60.0, help="training seconds the target allows")
    p.add_argument("--out", help="run folder to keep (default: a temporary one)")
    p.add_argument("--plot", help="copy the run's training plot (loss, answer accuracy) to this PNG")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = p.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "mqar"
    flags = ["--context", "64", "--num-kv-pairs", "4", "--vocab-size", "256", "--steps", str(args.steps),
             "--batch", str(args.batch), "--lr", str(args.lr), "--warmup", str(args.warmup),
             "--save-every", str(args.save_every)]
    run = cli_train(args.spec, "mqar", flags, out, args.threads)
    within = run.last_checkpoint_within(args.budget_s)
    results = {}
    for label, folder in (("budget", within), ("final", run.checkpoint(run.steps))):
        results[label] = None if folder is None else cli_eval(folder, ["--context", "64", "256"], args.samples,
                                                              args.threads)
    spec = Path(args.spec).resolve()
    report = {"spec": str(spec.relative_to(ROOT)) if spec.is_relative_to(ROOT) else args.spec,
              "model": run.model, "params": run.params, "steps": run.steps, "batch": args.batch, "lr": args.lr,
              "warmup": args.warmup, "train_wall_s": round(run.wall_s, 1), "train_cpu_s": round(run.cpu_s, 1),
              "steps_per_s": round(run.steps_per_s, 2), "step_within_budget": run.step_at(args.budget_s),
              "checkpoint_within_budget": None if within is None else within.name,
              "final_loss": run.records[-1]["loss"], "final_answer_token_acc": run.records[-1]["answer_token_acc"],
              "accuracy": results, "samples": args.samples, "machine": machine(args.threads)}
    print(json.dumps(report, indent=2))
    if args.plot:
        shutil.copyfile(out / "training.png", args.plot)
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)
    if args.no_write:
        return
    budget = results["budget"] or {}
    met = "MET" if budget.get(64, 0.0) >= 0.99 else "NOT MET"
    step_b = run.step_at(args.budget_s)
    rows = "\n".join(
        f"| {label} | {('-' if r is None else f'{r[64]:.3f}')} | {('-' if r is None else f'{r[256]:.3f}')} |"
        for label, r in ((f"{within.name if within else 'none'} (last checkpoint within {args.budget_s:.0f} s)",
                          results["budget"]), (f"step {run.steps} (final)", results["final"])))
    cmd = (f"python benchmarks/train_mqar.py --spec {report['spec']} --steps {args.steps} --batch {args.batch} "
           f"--lr {args.lr} --warmup {args.warmup} --threads {args.threads}")
    body = f"""### {datetime.date.today()}: MQAR through `ltmdsl train` / `ltmdsl eval` (`{cmd}`)

{run.model} ({run.params:,} parameters, `{report['spec']}`), MQAR context 64, 4 key-value pairs, vocab 256;
{args.steps} AdamW steps of {args.batch} samples (lr {args.lr}, warmup {args.warmup}, cosine to 0.1x, decay 0.1)
in {run.wall_s:.1f} s wall ({run.cpu_s:.1f} s CPU): {run.steps_per_s:.2f} steps/s, step {step_b} reached within
{args.budget_s:.0f} s. Final train loss {run.records[-1]['loss']:.3f}, answer-token accuracy
{run.records[-1]['answer_token_acc']:.3f} (last batch).
Machine: {machine(args.threads)}.

| checkpoint | exact match @ 64 (trained) | @ 256 (4x) |
|---|---|---|
{rows}

({args.samples} evaluation samples each, greedy decode through the cache.)
Target (>= 0.99 at context 64 within {args.budget_s:.0f} s of training): {met} on this machine and load.
"""
    write_section("train_mqar", body)


if __name__ == "__main__":
    main()
