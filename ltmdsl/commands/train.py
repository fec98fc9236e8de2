"""`ltmdsl train SPEC --task NAME [task options] --steps N --batch B --context T --out DIR`: train on a task.

Builds the spec's model (fp32 weights; `--dtype bf16` runs the forward under bf16 autocast), trains it with
AdamW on the task's answer tokens (ltmdsl.train) and writes checkpoints, DIR/metrics.jsonl and a plot to
DIR. `--resume` continues the run in DIR from its latest checkpoint exactly as if it had not stopped;
`--init CKPT` starts a new run from a checkpoint's weights (fresh optimizer and schedule), e.g. 2-hop
HashHop after a 1-hop run.
A progress bar goes to stderr when it is a terminal; `--json` prints each step's metrics as a JSON line.

Exit codes: 0 trained, 1 invalid spec, a checkpoint that cannot be resumed or a failed run,
2 usage errors (unknown task or option, vocab too small, bad values).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ltmdsl.commands.common import EXIT_OK, EXIT_SPEC, EXIT_USAGE, load_model
from ltmdsl.commands.stream import count
from ltmdsl.commands.task_options import add_task_arguments, given_options
from ltmdsl.distributed.plan import CP_SPLITS


def add_arguments(p) -> None:
    p.add_argument("file", metavar="SPEC", help="spec file (.ltm)")
    p.add_argument("--task", required=True, help="task to train on (hashhop, niah, mqar, vt, copy, induction, text)")
    p.add_argument("--steps", type=count, required=True, metavar="N", help="optimizer steps")
    p.add_argument("--batch", type=count, default=16, metavar="B", help="samples per micro-batch (default 16)")
    p.add_argument("--context", type=count, metavar="T", help="tokens per sample (default: the task's)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, metrics, plot")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps (default 10), then cosine")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default 1.0; 0 = none)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (default 0.1)")
    p.add_argument("--accum", type=count, default=1, metavar="K", help="micro-batches per step (default 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype (default fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    p.add_argument("--loss-chunk", type=count, default=1024, metavar="N", help="answer rows per loss chunk")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps (default: at the end)")
    p.add_argument("--stop-after", type=count, metavar="K", help="stop after K of the N steps (checkpointed; --resume continues)")
    p.add_argument("--resume", action="store_true", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("--init", metavar="CKPT",
                   help="start a new run from these weights (a run folder, checkpoint folder or weights file of "
                        "the same spec) with a fresh optimizer and schedule: a curriculum")
    p.add_argument("--model", help="which model of the file (default: the last one)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print each step's metrics as one JSON line")
    dist = p.add_argument_group(
        "distributed", "train on N ranks of torch.distributed (gloo on CPUs, NCCL with --device cuda). Under "
        "torchrun or a cluster launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) the same command "
        "runs as one rank of that group. The plan is the budget's (--budget, or the spec's training budget "
        "for that many GPUs when it has one), else data parallel over every rank; degrees given override it")
    dist.add_argument("--nproc", type=count, metavar="N", help="start N local workers")
    dist.add_argument("--budget", metavar="NAME", help="take the parallel plan of this budget of the spec")
    for degree, what in (("tp", "tensor"), ("pp", "pipeline"), ("cp", "context"), ("dp", "data"),
                         ("ep", "expert")):
        dist.add_argument(f"--{degree}", type=count, metavar="N", help=f"{what}-parallel degree")
    dist.add_argument("--etp", type=count, metavar="N",
                      help="expert tensor-parallel degree: the ranks splitting each expert's width (default tp; "
                           "1 folds whole experts over the tp ranks, Megatron-Core's MoE parallel folding)")
    dist.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (0-3)")
    dist.add_argument("--microbatches", type=count, metavar="M", help="pipeline micro-batches per step")
    dist.add_argument("--interleave", type=count, metavar="V",
                      help="virtual pipeline stages per rank (interleaved 1F1B; default 1)")
    dist.add_argument("--cp-split", choices=CP_SPLITS,
                      help="how cp splits a sequence (overrides the budget's cp_split): balanced (the default: "
                           "2*cp chunks, rank r holds chunks r and 2cp-1-r, so causal attention costs every rank "
                           "the same) or contiguous")
    add_task_arguments(p)


def run(args) -> int:
    spec, ir, code = load_model(args.file, args.model, show_warnings=not args.json)
    if ir is None:
        return code

    from tqdm import tqdm

    from ltmdsl.evals import TaskError, VocabError
    from ltmdsl.train import metrics
    from ltmdsl.train.loop import TrainConfig, task_data, train
    from ltmdsl.train.state import CheckpointError

    options = given_options(args)
    if args.context is not None:
        options["context"] = args.context
    try:
        config = TrainConfig(task=args.task, out=args.out, steps=args.steps, batch=args.batch, options=options,
                             accum=args.accum, lr=args.lr, warmup=args.warmup, clip=args.clip,
                             weight_decay=args.weight_decay, dtype=args.dtype, seed=args.seed,
                             loss_chunk=args.loss_chunk, save_every=args.save_every, stop_after=args.stop_after,
                             resume=args.resume, init=args.init, device=args.device)
    except ValueError as e:
        print(f"ltmdsl train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from ltmdsl.train.recall import recall_warning

    try:
        task_options = task_data(config).options
        context = task_options.context
    except (TaskError, VocabError) as e:
        print(f"ltmdsl train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    warning = recall_warning(ir, args.task, context)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    repeated = _repeated_samples(config, task_options)
    if repeated:
        print(f"warning: {repeated}", file=sys.stderr)
    show = not args.json and sys.stderr.isatty()
    from ltmdsl.train.parallel import launched_by_torchrun

    if args.nproc is not None or launched_by_torchrun():
        if args.init is not None:
            print("ltmdsl train: error: --init is for single-process runs; it is not supported with --nproc or "
                  "under torchrun", file=sys.stderr)
            return EXIT_USAGE
        return _run_distributed(args, spec, ir, config, context, show)
    bar = tqdm(total=args.stop_after or args.steps, unit="step", disable=not show, file=sys.stderr, desc=ir.name)
    last = None
    try:
        for record in train(ir, config):
            last = record
            if bar.n == 0 and record["step"] > 1:
                bar.update(record["step"] - 1)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['answer_token_acc']:.3f}")
            if args.json:
                print(json.dumps(record), flush=True)
    except (TaskError, VocabError) as e:
        print(f"ltmdsl train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as e:
        print(f"ltmdsl train: error: {e}", file=sys.stderr)
        return EXIT_SPEC
    finally:
        bar.close()
    if not metrics.have_matplotlib():
        print(f"ltmdsl train: note: {metrics.MISSING_MATPLOTLIB}", file=sys.stderr)
    if last is not None and not args.json:
        print(f"{ir.name}: step {last['step']}/{args.steps}, loss {last['loss']:.4f}, answer-token accuracy "
              f"{last['answer_token_acc']:.3f}, {last['seconds']:.1f} s; checkpoints in {args.out}")
    return EXIT_OK


_DEGREES = ("tp", "pp", "cp", "dp", "ep", "etp", "zero", "microbatches", "interleave", "cp_split")


def plan_of(args, spec, ir, world: int):
    """(plan, where it came from): --budget's plan, else the spec's one training budget of `world` GPUs
    for this model, else data parallel over `world`; degrees given on the command line override it."""
    from ltmdsl.distributed.plan import PlanError, plan_from

    given = {k: getattr(args, k) for k in _DEGREES if getattr(args, k) is not None}
    budget = None
    if args.budget is not None:
        budgets = {b.name: b for b in spec.ir.budgets if b.model == ir.name}
        if args.budget not in budgets:
            raise PlanError(f"no budget '{args.budget}' for model '{ir.name}' (budgets: "
                            f"{', '.join(budgets) or 'none'})")
        budget = budgets[args.budget]
    elif not given:
        fitting = [b for b in spec.ir.budgets if b.model == ir.name and b.mode == "training"
                   and b.parallel.world == world]
        if len(fitting) == 1:
            budget = fitting[0]
    if budget is not None:
        return plan_from(budget, world=world, **given), f"budget '{budget.name}'"
    return plan_from(world=world, **given), "the command line" if given else "data parallel (default)"


def _run_distributed(args, spec, ir, config, context: int, show: bool) -> int:
    """`--nproc N` (local workers) or one rank of a torchrun group: check the plan, then train."""
    import os

    from ltmdsl.distributed.launch import WorkerError
    from ltmdsl.distributed.plan import PlanError, describe
    from ltmdsl.evals import TaskError, VocabError
    from ltmdsl.train import parallel
    from ltmdsl.train.state import CheckpointError

    under_torchrun = parallel.launched_by_torchrun()
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.nproc
    if under_torchrun and args.nproc is not None and args.nproc != world:
        print(f"ltmdsl train: error: --nproc {args.nproc} inside a group of WORLD_SIZE={world} (started by "
              "torchrun or a launcher): drop --nproc", file=sys.stderr)
        return EXIT_USAGE
    try:
        plan, source = plan_of(args, spec, ir, world)
        parallel.check(ir, plan, world, batch=config.batch, context=context)
    except PlanError as e:
        print(f"ltmdsl train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    rank0 = not under_torchrun or os.environ.get("RANK") == "0"
    if rank0 and not args.json:
        print(f"{ir.name}: {world} ranks, plan {describe(plan)} (from {source})", file=sys.stderr)
    try:
        last = parallel.run(ir, config, plan, None if under_torchrun else world, json_lines=args.json,
                            progress=show)
    except (TaskError, VocabError) as e:
        print(f"ltmdsl train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as e:
        print(f"ltmdsl train: error: {e}", file=sys.stderr)
        return EXIT_SPEC
    except WorkerError as e:
        print(f"ltmdsl train: error: {e}", file=sys.stderr)
        return EXIT_SPEC
    if last is not None and not args.json:
        print(f"{ir.name}: step {last['step']}/{args.steps}, loss {last['loss']:.4f}, answer-token accuracy "
              f"{last['answer_token_acc']:.3f}, {last['seconds']:.1f} s on {world} ranks; checkpoints in "
              f"{args.out}")
    return EXIT_OK


def _repeated_samples(config, task_options) -> str | None:
    """The warning of `repeated_samples_warning` for `--init` (the run's resolved `task_options`), from the
    source run's record if it has one."""
    if config.init is None:
        return None
    from ltmdsl.commands.eval import run_folder_of
    from ltmdsl.train import state
    from ltmdsl.train.data import repeated_samples_warning

    folder = run_folder_of(Path(config.init))
    try:
        record = state.read_run(folder) if folder is not None else {}
    except state.CheckpointError:
        return None  # an unreadable record is the loader's to report, with the weights
    options = json.loads(json.dumps(dataclasses.asdict(task_options)))  # as run.json holds them
    return repeated_samples_warning(config.task, options, config.seed, record)
