"""HashHop (Magic.dev) on the tiny hybrid against a pure-SSM model of (nearly) equal parameters.

Each model trains through `ltmdsl train` (as a user runs it) for --steps AdamW steps of --batch samples on
HashHop at --context tokens: once on a mix of 1..max(--hops) hops (the task's `mixed_hops`, the default),
or with --no-mixed-hops once for each of --hops (a fresh model each time, same seed); then `ltmdsl eval`
scores exact match of the answers, decoded greedily through the cache, at each of --hops, at the trained
context and at 4x it. With --cot the completion writes every hop (`H1 = 'H2 = H3'`, Magic's chain of
thought), so k hops are k lookups, each of a hash the model has just written. The pure-SSM twin keeps
ltm-tiny's width, depth and short convolutions with every attention layer replaced by Mamba-2, and its MLP
width chosen so the parameter counts are as close as the sizes allow (both counts are printed). Numbers
go to the `train_hashhop` section of benchmarks/RESULTS.md with the machine's load.

    python benchmarks/train_hashhop.py [--spec examples/ltm-tiny.ltm] [--context 192] [--hash-length 2]
                                       [--queries 4] [--cot] [--mixed-hops] [--hops 1 2] [--steps 1000]
                                       [--batch 16] [--lr 3e-3] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import tempfile
from pathlib import Path

import ltmdsl
from train_report import cli_eval, cli_train, machine, write_section

ROOT = Path(__file__).resolve().parent.parent


def ssm_twin(hybrid_text: str, target: int):
    """ltm-tiny with every attention layer (`swa`, `full`) replaced by its Mamba-2 layer `ssm`, its MLP
    width tuned to `target` parameters."""
    text = re.sub(r"model (\w+) \{", r"model \1_ssm {", hybrid_text, count=1)
    text = re.sub(r"^    layer (swa|full) = .*\n", "", text, flags=re.M)
    text = re.sub(r"\A(#.*\n)+", "# the pure-SSM twin of the hybrid: every attention layer replaced by Mamba-2\n", text)
    text = re.sub(r"\b(swa|full)\b(?= [^=]*\})", "ssm", text)
    text = re.sub(r"budget .*", "", text, flags=re.S)
    best = None
    for d_ff in range(8, 257, 8):
        spec = ltmdsl.loads(re.sub(r"d_ff = \d+", f"d_ff = {d_ff}", text))
        gap = abs(spec.model.params_total - target)
        if best is None or gap < best[0]:
            best = (gap, spec)
    return best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples" / "ltm-tiny.ltm"))
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--hash-length", type=int, default=2)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--cot", action=argparse.BooleanOptionalAction, default=True,
                   help="chain of thought: the completion writes every hop")
    p.add_argument("--mixed-hops", action=argparse.BooleanOptionalAction, default=True,
                   help="one run per model on a mix of 1..max(--hops) hops (the task's mixed_hops), scored at "
                        "each of --hops; --no-mixed-hops trains a fresh model for each of --hops")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hops", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    hybrid = ltmdsl.load(args.spec)
    work = Path(tempfile.mkdtemp())
    ssm_path = work / "ssm-tiny.ltm"
    ssm_path.write_text(ssm_twin(hybrid.text, hybrid.model.params_total).text, encoding="utf-8")
    trainings = [(max(args.hops), args.hops)] if args.mixed_hops else [(h, [h]) for h in args.hops]
    rows = []
    for spec in (args.spec, str(ssm_path)):
        for hops, scored in trainings:
            flags = ["--context", str(args.context), "--hops", str(hops), "--hash-length", str(args.hash_length),
                     "--queries", str(args.queries), "--cot", str(args.cot).lower(),
                     "--mixed-hops", str(args.mixed_hops).lower(), "--steps", str(args.steps),
                     "--batch", str(args.batch), "--lr", str(args.lr), "--warmup", str(args.warmup)]
            run = cli_train(spec, "hashhop", flags, work / f"{Path(spec).stem}-{hops}", args.threads)
            acc = cli_eval(run.out, ["--context", str(args.context), str(4 * args.context),
                                     "--hops", *map(str, scored)], args.samples, args.threads)
            for h in scored:
                row = {"model": run.model, "params": run.params, "trained_hops": hops, "mixed": args.mixed_hops,
                       "hops": h, "steps": run.steps, "train_wall_s": round(run.wall_s, 1),
                       "train_cpu_s": round(run.cpu_s, 1), "steps_per_s": round(run.steps_per_s, 2),
                       "final_loss": run.records[-1]["loss"],
                       "final_answer_token_acc": run.records[-1]["answer_token_acc"],
                       "accuracy_trained": acc[(args.context, h)], "accuracy_4x": acc[(4 * args.context, h)]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    shutil.rmtree(work, ignore_errors=True)
    if args.no_write:
        return
    trained = (lambda r: f"1-{r['trained_hops']} mixed") if args.mixed_hops else (lambda r: str(r["trained_hops"]))
    table = "\n".join(f"| {r['model']} | {r['params']:,} | {trained(r)} | {r['hops']} | {r['final_loss']:.3f} | "
                      f"{r['final_answer_token_acc']:.3f} | {r['accuracy_trained']:.3f} | {r['accuracy_4x']:.3f} | "
                      f"{r['train_wall_s']:.0f} s / {r['train_cpu_s']:.0f} s ({r['steps_per_s']:.2f} steps/s) |"
                      for r in rows)
    met = {h: next((r["accuracy_trained"] for r in rows if r["model"] == hybrid.model.name and r["hops"] == h), None)
           for h in (1, 2)}
    verdict = ", ".join(f"{h}-hop {'-' if a is None else f'{a:.3f}'} ({'MET' if a is not None and a >= goal else 'NOT MET'})"
                        for h, a, goal in ((1, met[1], 0.95), (2, met[2], 0.8)))
    cmd = (f"python benchmarks/train_hashhop.py --context {args.context} --hash-length {args.hash_length} "
           f"--queries {args.queries} {'--cot' if args.cot else '--no-cot'} "
           f"{'--mixed-hops' if args.mixed_hops else '--no-mixed-hops'} --hops {' '.join(map(str, args.hops))} "
           f"--steps {args.steps} --batch {args.batch} --lr {args.lr} --warmup {args.warmup} --threads {args.threads}")
    runs = (f"each model trained once on samples of 1 to {max(args.hops)} hops in turn, sample i having "
            f"1 + i % {max(args.hops)}: the task's `mixed_hops`, and scored at each depth" if args.mixed_hops
            else "a fresh model for each number of hops")
    body = f"""### {datetime.date.today()}: HashHop, hybrid against pure SSM, through `ltmdsl train` / `ltmdsl eval` (`{cmd}`)

Each model trained by `ltmdsl train` for {args.steps} AdamW steps of {args.batch} samples at context
{args.context} ({runs}; {args.hash_length}-letter hashes, {args.queries} queries a sample,
{'chain of thought: every hop written' if args.cot else 'no chain of thought'}; lr {args.lr}, warmup {args.warmup}), then scored by `ltmdsl eval`: exact
match of the answer decoded through the cache on {args.samples} evaluation samples, at {args.context} and
{4 * args.context} tokens. The pure-SSM model is the hybrid with every attention layer replaced by Mamba-2
and its MLP width set for an equal parameter count. Exact match is per answer (every character between
the quotes), averaged over the queries; the training columns are the run's (shared by its rows).
Machine: {machine(args.threads)}.

| model | parameters | trained hops | scored hops | final train loss | answer-token acc (last batch) | exact match @ {args.context} | @ {4 * args.context} | train wall / CPU |
|---|---|---|---|---|---|---|---|---|
{table}

Targets (hybrid, at the trained context): 1-hop >= 0.95, 2-hop >= 0.8. Here: {verdict}.
"""
    write_section("train_hashhop", body)


if __name__ == "__main__":
    main()
