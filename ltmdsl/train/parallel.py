"""`ltmdsl train --nproc N`: the training loop of ltmdsl.train.loop, run by the ranks of a parallel plan.

    run(ir, config, plan, nproc=2)      # N forked workers (gloo on CPUs, NCCL with a CUDA device)
    run(ir, config, plan)               # in a process torchrun or a cluster launcher started (reads RANK, ...)

Every rank builds its shard of the model with `ltmdsl.distributed.parallelize` (meta build, tp split, FSDP,
shard-by-shard seeded init) and trains on the same samples the single-process loop would draw: each
optimizer step's micro-batches come from `TaskData` (a pure function of seed and step), split over the
data-parallel ranks by rows and over the context-parallel ranks by tokens.

The loss is the single-process one, exactly: the mean cross-entropy over the answer tokens of the global
micro-batch. Answers are first turned into per-position targets (position t predicts token t + 1 when it is
an answer, else IGNORE), so a cp split cannot cut an answer from the position that predicts it. Each rank
sums the cross-entropy of its answer rows (chunked, never [B, T, V] in fp32; under tp on its V/t logits,
vocab-parallel, the head never gathered; on the last pipeline stage the schedule's loss over the stage's logits), and scales it by R / N, where N is the answer count of the global
micro-batch and R the ranks that hold the same weights: their gradient average (FSDP2's reduce-scatter or
`sync_gradients`) is then the gradient of sum / N. The global gradient norm is reduced across every shard
before clipping. AdamW keeps the loop's decay groups; the schedule is the loop's warmup + cosine.

Checkpoints (DIR/checkpoints/step-N/, as the single-process loop's, written whole or not at all):
`dcp/` is the model and optimizer in torch.distributed.checkpoint's plan-independent form (so a run resumes
under another plan, resharded), `trainer.pt` the step, scheduler and RNG, and `model.safetensors` the whole
weights exported from dcp/ (what `ltmdsl eval` reads). ZeRO 1's optimizer (the distributed optimizer) writes its
state in the same plan-independent layout (ltmdsl.distributed.checkpoint), and the schedule sets the learning
rate of the AdamW stepping its shard.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

from ltmdsl.distributed.plan import PlanError, describe, plan_errors
from ltmdsl.ir import ModelIR, ParallelPlan

#: Target of a position that predicts no answer token (cross_entropy's default ignore_index).
IGNORE = -100


def check(ir: ModelIR, plan: ParallelPlan, world: int, *, batch: int, context: int) -> None:
    """Refuse, before any worker starts, a plan that cannot train `ir` on `world` ranks (every reason)."""
    errors = plan_errors(ir, plan, world, batch=batch, seq_len=context)
    kinds = [] if errors else _kind_errors(ir, plan)  # the kinds are asked only about a well-formed plan
    errors += kinds
    if errors:
        raise PlanError(f"plan {describe(plan)} cannot train model '{ir.name}' on {world} workers:\n  "
                        + "\n  ".join(errors))


def _kind_errors(ir: ModelIR, plan: ParallelPlan) -> list[str]:
    """What the layer kinds refuse under this plan (no tensor-parallel plan or a config it cannot split, no
    context-parallel form, a pipeline cut through a tie), asked before any worker starts."""
    from ltmdsl.distributed.context_parallel import cp_forwards
    from ltmdsl.distributed.pipeline import check_pipeline
    from ltmdsl.distributed.tensor_parallel import tp_plans

    errors = []
    for applies, probe in ((plan.tp > 1, lambda: tp_plans(ir, plan.tp, plan.expert_tp)),
                           (plan.cp > 1, lambda: cp_forwards(ir)),
                           (plan.pp > 1, lambda: check_pipeline(ir, plan.pp, plan.interleave))):
        if applies:
            try:
                probe()
            except ValueError as e:
                errors.append(str(e))
    return errors


def answer_targets(tokens, answer_mask):
    """targets [B, T]: tokens[t + 1] where answer_mask[t + 1], else IGNORE (the last position predicts nothing).

    The same rows and targets as `ltmdsl.train.loss.answer_rows`, in a form that survives a split of T."""
    import torch

    targets = torch.full_like(tokens, IGNORE)  # [B, T]
    targets[:, :-1] = torch.where(answer_mask[:, 1:], tokens[:, 1:], IGNORE)
    return targets


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a group someone else started (torchrun, SLURM wrappers)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run(ir: ModelIR, config, plan: ParallelPlan, nproc: int | None = None, *, json_lines: bool = False,
        progress: bool = False, timeout_s: float = 3600.0) -> dict | None:
    """Train `ir` as `config` says under `plan`: on `nproc` forked local workers, or (nproc None) as one rank
    of the group this process was started in. Returns rank 0's last metrics record (None on other ranks
    of a torchrun group)."""
    from ltmdsl.distributed.launch import init_from_env, launch

    if config.init is not None:  # not silently ignored: the ranks would start from fresh weights
        raise ValueError("TrainConfig.init (--init) is for single-process runs, not distributed ones")
    args = (ir, config, plan, json_lines, progress)
    if nproc is None:
        rank, _world = init_from_env(timeout_s=timeout_s)
        outcome = _rank_main(*args)
    else:
        backend = "nccl" if str(config.device).startswith("cuda") else "gloo"
        rank, outcome = 0, launch(_rank_main, nproc, args, backend=backend, timeout_s=timeout_s)[0]
    status, value = outcome
    if status == "error":
        raise _expected_errors()[value[0]](value[1])
    return value if rank == 0 else None


def _expected_errors() -> dict[str, type]:
    """The errors a run reports as a message (every rank raises them alike), by class name."""
    from ltmdsl.evals import TaskError, VocabError
    from ltmdsl.train.state import CheckpointError

    return {e.__name__: e for e in (TaskError, VocabError, CheckpointError, PlanError)}


# ---------------------------------------------------------------------------------------------------------
# One rank.
# ---------------------------------------------------------------------------------------------------------


def _rank_main(ir: ModelIR, config, plan: ParallelPlan, json_lines: bool, progress: bool) -> tuple:
    """Every rank: train, rank 0 reporting -> ("ok", last metrics record) or ("error", (class, message))
    for the errors every rank meets alike (a bad checkpoint, task or plan): a message, not a traceback."""
    try:
        return "ok", _train_and_report(ir, config, plan, json_lines, progress)
    except tuple(_expected_errors().values()) as e:
        return "error", (type(e).__name__, str(e))


def _train_and_report(ir: ModelIR, config, plan: ParallelPlan, json_lines: bool, progress: bool) -> dict | None:
    """train_rank, with rank 0 printing JSON lines and the progress bar; the last metrics record."""
    import json

    import torch.distributed as dist

    last = None
    emit: Callable[[dict], None] | None = None
    bar = None
    if dist.get_rank() == 0:
        from tqdm import tqdm

        bar = tqdm(total=config.stop_after or config.steps, unit="step", disable=not progress, file=sys.stderr,
                   desc=f"{ir.name} ({describe(plan)})")

        def emit(record: dict) -> None:
            if bar.n == 0 and record["step"] > 1:
                bar.update(record["step"] - 1)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['answer_token_acc']:.3f}")
            if json_lines:
                print(json.dumps(record), flush=True)
    try:
        for record in train_rank(ir, config, plan):
            last = record
            if emit is not None:
                emit(record)
    finally:
        if bar is not None:
            bar.close()
    return last


def train_rank(ir: ModelIR, config, plan: ParallelPlan):
    """This rank's share of the run (process group up); yields the step records (identical on every rank)."""
    import torch
    import torch.distributed as dist

    from ltmdsl.distributed import parallelize
    from ltmdsl.distributed.checkpoint import load as dcp_load
    from ltmdsl.distributed.data_parallel import make_optimizer
    from ltmdsl.train import groups, metrics, schedule, state
    from ltmdsl.train.loop import run_record, task_data

    data = task_data(config)
    data.task.tokenizer(data.options).fits(ir.vocab)
    check(ir, plan, dist.get_world_size(), batch=config.batch, context=data.options.context)
    out = Path(config.out)
    current = run_record(ir, config, data)
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(config.seed)
    ranked = parallelize(ir, plan, seed=config.seed, device=device)
    optimizer = make_optimizer(ranked.model, plan.zero, ranked.replica_mesh, config.lr,
                               params=groups.param_groups(ranked.model, config.weight_decay),
                               betas=config.betas, eps=1e-8)
    # the distributed optimizer (ZeRO 1) steps its shard with an inner AdamW, whose groups are its param_groups
    # the torch optimizer whose groups' lr the schedule sets: the distributed optimizer's inner one, both halves'
    # groups under ep x ZeRO 1
    target = optimizer.scheduled() if hasattr(optimizer, "scheduled") else getattr(optimizer, "optim", optimizer)
    sched = schedule.scheduler(target, config.warmup, config.steps, config.min_lr_ratio)
    rank0 = dist.get_rank() == 0
    start = _begin(out, current, config.resume, rank0, describe(plan))
    if start:
        where = out / state.checkpoint_name(start)
        if not (where / state.DCP).is_dir():
            raise state.CheckpointError(f"{where}: written by a single-process run (no {state.DCP}/); resume it "
                                        "without --nproc")
        dcp_load(ranked, optimizer, where / state.DCP)
        trainer = state.load_trainer(where)
        sched.load_state_dict(trainer.scheduler)
        torch.set_rng_state(trainer.rng)
    log = metrics.MetricsLog(out) if rank0 else None
    stop = config.stop_after or config.steps
    began = time.perf_counter()
    try:
        ranked.model.train()
        for step in range(start, stop):
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, count = 0.0, 0, 0
            for micro in range(config.accum):
                tokens, mask = data.micro_batch(step, micro, device)  # [B, T], [B, T]: the global micro-batch
                loss, right, n = _micro_step(ranked, tokens, mask, config)
                loss_sum += loss / config.accum
                correct += right
                count += n
            _sync(ranked)
            norm = _clip(ranked, config.clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            sched.step()
            done = step + 1
            record = {"step": done, "loss": round(loss_sum, 6), "answer_token_acc": round(correct / count, 6),
                      "lr": lr, "grad_norm": round(norm, 6), "samples": done * config.batch * config.accum,
                      "seconds": round(time.perf_counter() - began, 3)}
            if log is not None:
                log.write(record)
            if (config.save_every and done % config.save_every == 0) or done == stop:
                _save(out, ranked, optimizer, sched, done)
            yield record
    finally:
        if log is not None:
            log.close()
    if rank0:
        options = ", ".join(f"{k}={v}" for k, v in current["options"].items())
        metrics.plot_training(metrics.read(out / metrics.METRICS), out / metrics.PLOT,
                              f"{ir.name} on {config.task} ({options}; {describe(plan)})")


def _begin(out: Path, current: dict, resume: bool, rank0: bool, plan_text: str) -> int:
    """The step to start from (0 for a new run); rank 0 checks the folder, the others follow its verdict."""
    import torch.distributed as dist

    from ltmdsl.train import metrics, state
    from ltmdsl.train.loop import check_resume

    verdict: list = [None]
    if rank0:
        try:
            if resume:
                check_resume(state.read_run(out), current, str(out))
                found = state.latest(out)
                if found is None:
                    raise state.CheckpointError(f"{out}: nothing to resume (no checkpoint yet)")
                verdict[0] = ("ok", found[0])
                metrics.truncate(out / metrics.METRICS, found[0])
            else:
                if (out / state.RUN).exists() or (out / state.LATEST).exists():
                    raise state.CheckpointError(f"{out}: already holds a training run; pass --resume to continue "
                                                "it or choose another --out")
                state.write_run(out, {**current, "plan": plan_text})
                verdict[0] = ("ok", 0)
        except state.CheckpointError as e:
            verdict[0] = ("error", str(e))
    dist.broadcast_object_list(verdict, src=0)
    status, value = verdict[0]
    if status == "error":
        raise state.CheckpointError(value)
    return int(value)


def _micro_step(ranked, tokens, mask, config) -> tuple[float, int, int]:
    """Forward and backward of one global micro-batch on this rank -> (its mean loss, correct, answers),
    every number for the whole micro-batch (reduced over the ranks)."""
    import torch
    import torch.distributed as dist

    from ltmdsl.distributed import shard_batch
    from ltmdsl.train.loss import summed_target_loss

    targets = answer_targets(tokens, mask)  # [B, T]
    total = int((targets != IGNORE).sum())  # the global micro-batch's answers (every rank has all of it)
    if total == 0:
        raise ValueError("no answer tokens in the batch: nothing to train on")
    replicas = ranked.replica_mesh.size()
    weight = replicas / (total * config.accum)  # gradient average over replicas -> d(sum / total) / accum
    ids, tgt = shard_batch(tokens, ranked), shard_batch(targets, ranked)  # [B/dp, T/cp]
    stats = torch.zeros(2, dtype=torch.float64)  # [summed loss, correct] of this rank's answers
    if ranked.plan.pp > 1:
        from ltmdsl.distributed.pipeline import pipeline_step

        stats += pipeline_step(ranked.schedule, ranked.model, ids, tgt, weight, config.loss_chunk)
        dist.all_reduce(stats, group=ranked.pp_mesh.get_group())  # only the last stage has numbers
    else:
        hidden = ranked.model(ids, output="hidden")  # [b, t, d]
        # chunked, vocab-parallel under tp; no answers here: a zero loss whose backward still fires FSDP's collectives
        summed, right, _ = summed_target_loss(ranked.model, hidden, tgt, config.loss_chunk, IGNORE)
        stats[0], stats[1] = float(summed.detach()), right
        (summed * weight).backward()
    dist.all_reduce(stats, group=ranked.replica_mesh.get_group())
    return float(stats[0]) / total, int(stats[1]), total


def _sync(ranked) -> None:
    """Average the gradients of ranks holding the same weights where FSDP2 does not (ZeRO 0/1)."""
    from ltmdsl.distributed.data_parallel import FSDP_STAGES, sync_gradients

    if ranked.plan.zero not in FSDP_STAGES:
        sync_gradients(ranked.model, ranked.replica_mesh, ranked.dp_sharded, ranked.expert_replicas)


def _clip(ranked, clip: float) -> float:
    """Clip every gradient by the global norm (over all shards and stages); returns that norm."""
    import torch
    import torch.distributed as dist

    from ltmdsl.distributed.step import row_layouts

    params = [p for p in ranked.model.parameters() if p.grad is not None]  # ZeRO 1's groups hold pieces of them
    layouts = row_layouts(ranked.model)
    # a tp-side tensor holding some stored rows several times (KV heads, Mamba-2's B and C at n_groups < t,
    # replicated over the ranks) counts each once: each tp-side row weighted by 1 / its copies
    weights = {id(p): layouts[n].row_weights() for n, p in ranked.model.named_parameters() if n in layouts}
    squares = torch.zeros((), dtype=torch.float64)
    for p in params:
        squares += _square_sum(p, ranked, weights.get(id(p)))
    if ranked.plan.pp > 1:  # each stage holds other parameters
        dist.all_reduce(squares, group=ranked.pp_mesh.get_group())
    norm = float(squares.sqrt())
    if clip > 0:
        coef = min(clip / (norm + 1e-6), 1.0)
        for p in params:
            p.grad.mul_(coef)
    return norm


def _square_sum(param, ranked, row_weights=None):
    """sum(grad ** 2) of the whole gradient of `param`: a DTensor's local shard summed over the mesh dims it
    is sharded on; an expert parameter split over dp (ep) summed over dp; a replicated one as it is.
    `row_weights` [rows] (RowLayout.row_weights) weighs each row of a tp-side gradient (a DTensor)."""
    import torch.distributed as dist

    grad = param.grad
    if hasattr(grad, "to_local"):
        if row_weights is not None:
            from torch.distributed.tensor import DTensor, Replicate

            w = row_weights.view(-1, *[1] * (grad.ndim - 1)).to(grad.device)  # [rows, 1, ...]
            w = DTensor.from_local(w, grad.device_mesh, [Replicate()] * grad.device_mesh.ndim, run_check=False)
            local = (grad.detach().double().pow(2) * w).to_local().sum()  # this rank's rows, each / its copies
        else:
            local = grad.to_local().detach().double().pow(2).sum()
        for dim, placement in enumerate(grad.placements):
            # not is_shard(): FSDP2's _StridedShard (dp over a tp-sharded dim, edp over ep's experts) is no Shard
            if not placement.is_replicate():
                dist.all_reduce(local, group=grad.device_mesh.get_group(dim))
        return local.cpu()
    local = grad.detach().double().pow(2).sum()
    if id(param) in ranked.dp_sharded:
        dist.all_reduce(local, group=ranked.dp_mesh.get_group())
    return local.cpu()


def _save(out: Path, ranked, optimizer, sched, step: int) -> None:
    """Checkpoint `step` whole: every rank writes its DCP shards into rank 0's staging folder, then rank 0
    adds trainer.pt and the exported weights and swaps the folder in, then points latest.json at it."""
    import json

    import torch
    import torch.distributed as dist

    from ltmdsl import atomic
    from ltmdsl.distributed import checkpoint as dcp_checkpoint
    from ltmdsl.train import state

    rel = state.checkpoint_name(step)
    staging: list = [None]
    if dist.get_rank() != 0:
        dist.broadcast_object_list(staging, src=0)
        if staging[0] is None:
            raise state.CheckpointError(f"{out / rel}: rank 0 could not prepare the checkpoint folder")
        dcp_checkpoint.save(ranked, optimizer, Path(staging[0]) / state.DCP, step=step)
        dist.barrier()  # rank 0 has finished the folder and latest.json
        return
    (out / state.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    try:
        folder = atomic.directory(out / rel)
        tmp = folder.__enter__()
    except BaseException:
        dist.broadcast_object_list(staging, src=0)  # None: the other ranks stop too
        raise
    try:
        staging[0] = str(tmp)
        dist.broadcast_object_list(staging, src=0)
        dcp_checkpoint.save(ranked, optimizer, tmp / state.DCP, step=step)
        dcp_checkpoint.export(tmp / state.DCP, ranked.model.ir, tmp / state.MODEL)
        torch.save({"step": step, "optimizer": None, "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / state.TRAINER)
    except BaseException:
        folder.__exit__(*sys.exc_info())
        raise
    folder.__exit__(None, None, None)
    atomic.write_text(out / state.LATEST, json.dumps({"step": step, "checkpoint": rel}) + "\n")
    dist.barrier()
