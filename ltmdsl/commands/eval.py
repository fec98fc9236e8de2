"""`ltmdsl eval RUN --task NAME [--context T...] [--hops K...] [--samples N] [--grid] [--compare B C ...]`.

RUN is a training folder (its latest checkpoint), a checkpoint folder or a checkpoint file. Each setting
(context, hops) is scored by exact match of the answers, decoded greedily through the cache (prefill, then
one token at a time: ltmdsl.train.scoring), on samples of an evaluation seed no training run draws from.
The task and its options default to the ones RUN was trained with; options given here override them.
`--grid` sweeps contexts (half, 1x, 2x and 4x the trained one unless --context lists them) and, for tasks
with hops, hops 1..4 unless --hops lists them. `--compare` adds runs as columns of one table and lines of
one plot (`--plot PNG`; by default eval-TASK.png in RUN when RUN is a folder and there is more than one
setting or run). A warning is printed when a task needs recall beyond every sliding window of a model.

Exit codes: 0 scored, 1 a checkpoint that cannot be read, 2 usage errors (unknown task or option, a vocab
too small for the task, options that do not fit the context).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE
from ltmdsl.commands.stream import count
from ltmdsl.commands.task_options import add_task_arguments, given_options

GRID_HOPS = (1, 2, 3, 4)
GRID_SCALES = (0.5, 1, 2, 4)


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="training folder, checkpoint folder or checkpoint file")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="more runs to score beside RUN")
    p.add_argument("--task", help="task (default: the one RUN was trained on)")
    p.add_argument("--context", type=count, nargs="+", metavar="T", help="context length(s) in tokens")
    p.add_argument("--samples", type=count, default=100, metavar="N", help="samples per setting (default 100)")
    p.add_argument("--seed", type=int, default=None, help="evaluation seed (default: a fixed eval-only stream)")
    p.add_argument("--grid", action="store_true", help="sweep contexts (0.5-4x trained) and hops (1-4)")
    p.add_argument("--chunk", type=count, default=4096, metavar="C", help="prefill chunk in tokens (default 4096)")
    p.add_argument("--plot", metavar="PNG", help="write accuracy against context to PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_task_arguments(p, multi=("hops",))


def run_folder_of(path: Path) -> Path | None:
    """The training folder RUN belongs to (itself, or two levels above a checkpoint), if any."""
    from ltmdsl.train import state

    for candidate in (path, path.parent, path.parent.parent, path.parent.parent.parent):
        if (candidate / state.RUN).is_file():
            return candidate
    return None


def settings(task, base: dict, args, trained_context: int | None) -> list[dict]:
    """The option sets to score: the product of the contexts and hops asked for (or the grid's)."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(task.options)}
    context = trained_context or base.get("context") or task.defaults().context
    if args.context:
        contexts = list(args.context)
    elif args.grid:
        contexts = sorted({max(int(context * s), 2) for s in GRID_SCALES})
    else:
        contexts = [context]
    hops_given = given_options(args).get("hops")
    if "hops" not in fields:
        hops = [None]
    elif hops_given:
        hops = list(hops_given)
    elif args.grid:
        hops = list(GRID_HOPS)
    else:
        hops = [base.get("hops", task.defaults().hops)]
    out = []
    for h in hops:
        for c in contexts:
            options = dict(base, context=c)
            if h is not None:
                options["hops"] = h
            out.append(options)
    return out


def run(args) -> int:
    import torch  # noqa: F401  (the runtime)
    from tqdm import tqdm

    import ltmdsl
    from ltmdsl.evals import TaskError, VocabError, get_task
    from ltmdsl.tensorfile import TensorFileError
    from ltmdsl.errors import SpecError
    from ltmdsl.train import metrics, state
    from ltmdsl.train.data import EVAL_SEED
    from ltmdsl.train.recall import recall_warning
    from ltmdsl.train.scoring import score

    runs = [args.run] + list(args.compare)
    loaded = []
    for run in runs:
        try:
            path = state.model_file(run)
            model = ltmdsl.load_checkpoint(path)
        except (state.CheckpointError, TensorFileError, OSError) as e:
            print(f"ltmdsl eval: error: {e}", file=sys.stderr)
            return EXIT_SPEC
        except SpecError as e:
            print(e.render(), file=sys.stderr)
            return EXIT_SPEC
        folder = run_folder_of(Path(run))
        record = state.read_run(folder) if folder is not None else {}
        loaded.append((run, model, record))
    first = loaded[0][2]
    task_name = args.task or first.get("task")
    if not task_name:
        print("ltmdsl eval: error: RUN is not a training folder; name the task with --task", file=sys.stderr)
        return EXIT_USAGE
    cli_options = {k: v for k, v in given_options(args).items() if k != "hops"}
    rows: list[dict] = []
    warned: set[str] = set()
    try:
        task = get_task(task_name)
        work = []  # (run, model, its training options, one setting's options), every one checked before scoring
        for run, model, record in loaded:
            trained = record.get("options", {}) if record.get("task") == task_name else {}
            trained = {k: v for k, v in trained.items() if k not in task.train_only}  # a training mix
            base = {**trained, **cli_options}
            for values in settings(task, base, args, trained.get("context")):
                options = task.make_options(**values)
                task.tokenizer(options).fits(model.ir.vocab)
                work.append((run, model, trained, options))
    except (TaskError, VocabError) as e:
        print(f"ltmdsl eval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    # a bar over every sample of every setting, on a terminal and without --json (as `ltmdsl train`)
    bar = tqdm(total=len(work) * args.samples, unit="sample", disable=args.json or not sys.stderr.isatty(),
               file=sys.stderr, desc=task_name)
    seed = EVAL_SEED if args.seed is None else args.seed
    with bar:
        for run, model, trained, options in work:
            warning = recall_warning(model.ir, task_name, options.context)
            if warning and run not in warned:  # once per run, at its first context past the windows
                warned.add(run)
                tqdm.write(f"warning: {run}: {warning}", file=sys.stderr)
            bar.set_postfix(context=f"{options.context:,}", refresh=False)
            result = score(model, task, options, seed, args.samples, args.chunk, on_sample=bar.update)
            rows.append({"run": run, "model": model.ir.name, "task": task_name, "context": options.context,
                         "hops": getattr(options, "hops", None), "samples": result.samples,
                         "accuracy": round(result.accuracy, 6),
                         "trained_context": trained.get("context")})
    if args.json:
        print(json.dumps({"task": task_name, "results": rows}, indent=2))
    else:
        print_table(rows, runs)
    plot = args.plot
    if plot is None and (len(rows) > len(runs) or len(runs) > 1) and Path(args.run).is_dir():
        plot = str(Path(args.run) / f"eval-{task_name}.png")
    if plot:
        if not metrics.have_matplotlib():
            print(f"ltmdsl eval: note: {metrics.MISSING_MATPLOTLIB}", file=sys.stderr)
        else:
            plot_rows(rows, plot, task_name)
            if not args.json:
                print(f"plot: {plot}")
    return EXIT_OK


def print_table(rows: list[dict], runs: list[str]) -> None:
    """One line per setting, one accuracy column per run."""
    keys = sorted({(r["context"], r["hops"]) for r in rows}, key=lambda k: (k[1] or 0, k[0]))
    width = max(12, *(len(r) for r in runs))
    has_hops = any(h is not None for _, h in keys)
    head = f"{'context':>10}" + (f"{'hops':>6}" if has_hops else "") + "".join(f"  {r:>{width}}" for r in runs)
    print(head)
    for context, hops in keys:
        line = f"{context:>10,}" + (f"{hops:>6}" if has_hops else "")
        for run in runs:
            match = [r for r in rows if r["run"] == run and r["context"] == context and r["hops"] == hops]
            line += f"  {match[0]['accuracy']:>{width}.3f}" if match else f"  {'-':>{width}}"
        print(line)


def plot_rows(rows: list[dict], path: str, task: str) -> None:
    """Accuracy against context (log x), one line per run and hops; trained contexts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ltmdsl import atomic

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = sorted({(r["run"], r["hops"]) for r in rows}, key=lambda k: (k[0], k[1] or 0))
    for run, hops in lines:
        pts = sorted((r["context"], r["accuracy"]) for r in rows if r["run"] == run and r["hops"] == hops)
        label = run if hops is None else f"{run}, {hops} hop{'s' if hops != 1 else ''}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for trained in {r["trained_context"] for r in rows if r["trained_context"]}:
        ax.axvline(trained, linestyle="--", linewidth=0.8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context (tokens); dashed: trained context")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"{task}", fontsize=10)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic.temporary_sibling(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
