"""HashHop (Magic.dev) on the tiny hybrid against a pure-SSM model of (nearly) equal parameters.

Each model trains through `ltmdsl train` (as a user runs it) in stages, one per entry of --hops: stage i
trains on HashHop of hops[i] links with queries[i] questions a sample, for stop_after[i] steps of a
steps[i]-step warmup + cosine schedule of batch[i] samples at peak rate lr[i], starting (`--init`) from the
weights the stage before ended with. Consecutive entries of one depth continue a depth with a fresh
schedule; a later depth is a curriculum, since a model that can follow one link learns a second far sooner
than a fresh one learns both (`--no-curriculum` starts every stage fresh; `--mixed-hops` instead trains one
model on a mix of 1..max(--hops) links, the task's `mixed_hops`). Then `ltmdsl eval` scores exact match of
the answers, decoded greedily through the cache, at the trained context and at 4x it: the last stage of
each depth at its own depth, and the last stage's at every depth. With --cot the completion writes every hop
(`H1 = 'H2 = H3'`, Magic's chain of thought), so k hops are k lookups, each of a hash the model has just
written. The pure-SSM twin keeps ltm-tiny's width, depth and short convolutions with every attention
layer replaced by Mamba-2, and its MLP width chosen so the parameter counts are as close as the sizes
allow (both counts are printed). The two models train side by side (one process each, --threads torch
threads each), as the CPU has two cores. Numbers go to the `train_hashhop` section of
benchmarks/RESULTS.md with the machine's load.

Each stage draws its own samples (data seed = the stage's index unless --seed says otherwise): a run's
samples are a function of its seed and step, so stages of one seed would see the same samples again.
The default is 1500 steps at one hop, then 1000 at two hops (64 samples a step at lr 1e-3 each).

    python benchmarks/train_hashhop.py [--spec examples/ltm-tiny.ltm] [--context 128] [--hash-length 2]
                                       [--hops 1 2] [--queries 4 2]
                                       [--steps 1500 1000] [--stop-after K ...]
                                       [--lr 1e-3 1e-3] [--batch 64 64]
                                       [--weight-decay 0.1] [--seed S ...] [--warmup 20] [--samples 100]
                                       [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ltmdsl
from train_report import TrainRun, cli_eval, cli_train, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {1: 0.95, 2: 0.8}  # the issue's: exact match of the hybrid at the trained context


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


@dataclass(frozen=True)
class Stage:
    """One `ltmdsl train` run of a model: `hops` links, `queries` questions, `stop_after` of `steps` steps of
    `batch` samples at peak rate `lr`."""

    hops: int
    queries: int
    steps: int
    stop_after: int
    mixed: bool
    lr: float
    batch: int
    weight_decay: float
    seed: int

    @property
    def label(self) -> str:
        return f"1-{self.hops} mixed" if self.mixed else str(self.hops)


def per_stage(values: list, n: int, name: str) -> list:
    """One value per stage: as given, or a single value for every stage."""
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise SystemExit(f"--{name} takes one value or one per --hops entry ({n}); got {len(values)}")
    return values


def train_model(spec: str, stages: list[Stage], args, work: Path) -> list[tuple[Stage, TrainRun]]:
    """The stages of one model in order, each (with --curriculum) from the weights of the one before."""
    runs: list[tuple[Stage, TrainRun]] = []
    for stage in stages:
        flags = ["--context", str(args.context), "--hops", str(stage.hops), "--hash-length", str(args.hash_length),
                 "--queries", str(stage.queries), "--cot", str(args.cot).lower(),
                 "--mixed-hops", str(stage.mixed).lower(), "--steps", str(stage.steps),
                 "--stop-after", str(stage.stop_after), "--batch", str(stage.batch), "--lr", str(stage.lr),
                 "--weight-decay", str(stage.weight_decay), "--seed", str(stage.seed),
                 "--warmup", str(args.warmup)]
        if args.curriculum and runs:
            flags += ["--init", str(runs[-1][1].out)]
        out = work / f"{Path(spec).stem}-stage{len(runs) + 1}-{stage.hops}"
        runs.append((stage, cli_train(spec, "hashhop", flags, out, args.threads)))
    return runs


def score(runs: list[tuple[Stage, TrainRun]], args) -> list[dict]:
    """Rows of exact match: the last stage of each run of stages at one depth, at that depth (every depth for a
    mixed run), and the last stage at every depth. A stage that the next one continues at its depth is not
    scored (its row would only be a point on the way)."""
    rows = []
    every = sorted({s.hops for s, _ in runs} | {h for s, _ in runs if s.mixed for h in range(1, s.hops + 1)})
    total, wall, cpu = 0, 0.0, 0.0
    for i, (stage, run) in enumerate(runs):
        total, wall, cpu = total + run.steps, wall + run.wall_s, cpu + run.cpu_s
        continued = i + 1 < len(runs) and runs[i + 1][0].hops == stage.hops and not stage.mixed
        if continued:
            continue
        scored = every if i == len(runs) - 1 or stage.mixed else [stage.hops]
        acc = cli_eval(run.out, ["--context", str(args.context), str(4 * args.context),
                                 "--hops", *map(str, scored)], args.samples, args.threads)
        for h in scored:
            rows.append({"model": run.model, "params": run.params, "trained_hops": stage.label, "hops": h,
                         "queries": stage.queries, "steps": run.steps, "schedule_steps": stage.steps,
                         "steps_in_all": total, "lr": stage.lr, "batch": stage.batch,
                         "init": bool(args.curriculum and i), "train_wall_s": round(run.wall_s, 1),
                         "train_cpu_s": round(run.cpu_s, 1), "steps_per_s": round(run.steps_per_s, 2),
                         "train_wall_s_in_all": round(wall, 1), "train_cpu_s_in_all": round(cpu, 1),
                         "final_loss": run.records[-1]["loss"],
                         "final_answer_token_acc": run.records[-1]["answer_token_acc"],
                         "accuracy_trained": acc[(args.context, h)], "accuracy_4x": acc[(4 * args.context, h)]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples" / "ltm-tiny.ltm"))
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--hash-length", type=int, default=2)
    p.add_argument("--hops", type=int, nargs="+", default=[1, 2],
                   help="one stage per entry, in order")
    p.add_argument("--queries", type=int, nargs="+", default=[4, 2],
                   help="questions a sample, per stage (2-hop chains are longer: 3 fit beside 2 queries at 128)")
    p.add_argument("--steps", type=int, nargs="+", default=[1500, 1000],
                   help="schedule length per stage")
    p.add_argument("--stop-after", type=int, nargs="+", help="steps run per stage (default: all of --steps)")
    p.add_argument("--cot", action=argparse.BooleanOptionalAction, default=True,
                   help="chain of thought: the completion writes every hop")
    p.add_argument("--curriculum", action=argparse.BooleanOptionalAction, default=True,
                   help="start each stage from the weights of the stage before (ltmdsl train --init)")
    p.add_argument("--mixed-hops", action="store_true",
                   help="instead of stages, one run per model on a mix of 1..max(--hops) hops (the task's "
                        "mixed_hops), scored at each depth")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 64],
                   help="samples a step, per stage")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-3],
                   help="peak learning rate, per stage")
    p.add_argument("--weight-decay", type=float, nargs="+", default=[0.1], help="AdamW decay, per stage")
    p.add_argument("--seed", type=int, nargs="+",
                   help="data seed per stage (default: the stage's index, so each stage trains on samples no "
                        "stage before it saw; a run's samples are a function of its seed and step)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--samples", type=int, default=100, help="evaluation samples per (context, hops)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each of the two training runs")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.mixed_hops:
        n = 1
        hops = [max(args.hops)]
    else:
        n = len(args.hops)
        hops = args.hops
    queries = per_stage(args.queries, n, "queries")
    steps = per_stage(args.steps, n, "steps")
    stop = per_stage(args.stop_after or steps, n, "stop-after")
    lrs = per_stage(args.lr, n, "lr")
    batches = per_stage(args.batch, n, "batch")
    decays = per_stage(args.weight_decay, n, "weight-decay")
    seeds = per_stage(args.seed or list(range(n)), n, "seed")
    stages = [Stage(h, q, s, a, args.mixed_hops, lr, b, wd, seed)
              for h, q, s, a, lr, b, wd, seed in zip(hops, queries, steps, stop, lrs, batches, decays, seeds)]
    hybrid = ltmdsl.load(args.spec)
    work = Path(tempfile.mkdtemp())
    ssm_path = work / "ssm-tiny.ltm"
    ssm_path.write_text(ssm_twin(hybrid.text, hybrid.model.params_total).text, encoding="utf-8")
    with ThreadPoolExecutor(2) as pool:  # each run is its own process; the two models side by side
        trained = list(pool.map(lambda spec: train_model(spec, stages, args, work), (args.spec, str(ssm_path))))
    rows = [row for runs in trained for row in score(runs, args)]
    for row in rows:
        print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if not args.no_write:
        write_section("train_hashhop", report(args, stages, rows, hybrid.model.name))


def report(args, stages: list[Stage], rows: list[dict], hybrid: str) -> str:
    """The RESULTS.md section: the command, the setting, the table and the verdict on the targets."""
    table = "\n".join(f"| {r['model']} | {r['params']:,} | {r['trained_hops']} ({r['queries']} queries) | "
                      f"{r['steps_in_all']:,} (last stage {r['steps']} of {r['schedule_steps']}, lr {r['lr']:g}, "
                      f"batch {r['batch']}) | {r['hops']} | {r['final_loss']:.3f} | "
                      f"{r['final_answer_token_acc']:.3f} | {r['accuracy_trained']:.3f} | {r['accuracy_4x']:.3f} | "
                      f"{r['train_wall_s_in_all']:.0f} s / {r['train_cpu_s_in_all']:.0f} s "
                      f"({r['steps_per_s']:.2f} steps/s) |" for r in rows)

    def best(h: int) -> float | None:  # the hybrid's stage trained at depth h (or a mixed run) scored at h
        found = [r["accuracy_trained"] for r in rows if r["model"] == hybrid and r["hops"] == h
                 and (r["trained_hops"] == str(h) or "mixed" in r["trained_hops"])]
        return found[0] if found else None

    verdict = ", ".join(f"{h}-hop {'-' if a is None else f'{a:.3f}'} ({'MET' if a is not None and a >= goal else 'NOT MET'})"
                        for h, goal in TARGETS.items() for a in [best(h)])
    listed = lambda values: " ".join(map(str, values))  # noqa: E731
    cmd = (f"python benchmarks/train_hashhop.py --context {args.context} --hash-length {args.hash_length} "
           f"--hops {listed(s.hops for s in stages) if not args.mixed_hops else listed(args.hops)} "
           f"{'--mixed-hops ' if args.mixed_hops else ''}--queries {listed(s.queries for s in stages)} "
           f"--steps {listed(s.steps for s in stages)} --stop-after {listed(s.stop_after for s in stages)} "
           f"{'--cot' if args.cot else '--no-cot'} {'--curriculum' if args.curriculum else '--no-curriculum'} "
           f"--batch {listed(s.batch for s in stages)} --lr {listed(s.lr for s in stages)} "
           f"--weight-decay {listed(s.weight_decay for s in stages)} --seed {listed(s.seed for s in stages)} "
           f"--warmup {args.warmup} --samples {args.samples} "
           f"--threads {args.threads}")
    how = ("one run per model on samples of 1 to {h} hops in turn (the task's `mixed_hops`), scored at each "
           "depth".format(h=stages[0].hops) if args.mixed_hops else
           "`ltmdsl train` stages in turn, one per entry of --hops, each " +
           ("started (`--init`) from the weights the stage before ended with" if args.curriculum
            else "from fresh weights"))
    return f"""### {datetime.date.today()}: HashHop, hybrid against pure SSM, through `ltmdsl train` / `ltmdsl eval` (`{cmd}`)

Each model trained by `ltmdsl train` at context {args.context} ({how}; {args.hash_length}-letter hashes,
{'chain of thought: every hop written' if args.cot else 'no chain of thought'}; each stage AdamW with its
own batch and peak rate, warmup {args.warmup}, cosine over the stage's schedule), then scored by `ltmdsl
eval`: exact match of the answer decoded through the cache on {args.samples} evaluation samples (the
evaluation seed, never trained on) at {args.context} and {4 * args.context} tokens. The last stage of each
depth is scored at that depth, and the last stage at every depth.
The pure-SSM model is the hybrid with every attention layer replaced by Mamba-2 and its MLP width set
for an equal parameter count; it runs the same stages and steps, side by side with the hybrid (one
process each). Exact match is per answer (every character between the quotes), averaged over the
queries. Loss and answer-token accuracy are the last batch's of the row's stage; steps and times count
every stage up to it (the rate is the row's stage's).
Machine: {machine(args.threads)}.

| model | parameters | trained hops | steps | scored hops | final train loss | answer-token acc (last batch) | exact match @ {args.context} | @ {4 * args.context} | train wall / CPU |
|---|---|---|---|---|---|---|---|---|---|
{table}

Targets (hybrid, at the trained context, each depth scored on the stage trained at it): 1-hop >= 0.95,
2-hop >= 0.8. Here: {verdict}.
"""


if __name__ == "__main__":
    main()
