"""The training loop: AdamW with decay groups, warmup + cosine, clipping, autocast, accumulation.

    config = TrainConfig(task="mqar", options={"context": 64}, steps=200, batch=32, out="runs/mqar")
    for record in train(ir, config): ...      # one metrics dict per optimizer step

Each step: `accum` micro-batches (ltmdsl.train.data) through the answer-only chunked loss
(ltmdsl.train.loss) under fp32 or bf16 autocast, each micro-batch's mean loss divided by `accum`;
gradients clipped to a global norm of `clip` (0: measured, not clipped); one AdamW step; one schedule step.
Checkpoints every `save_every` steps and at the end (ltmdsl.train.state). `until(model, record)`, when
given, is asked after every step whether to stop there (a benchmark's held-out score crossing a target):
True ends the run at that step with a checkpoint, and the time it spends is left out of the run's clock
(`seconds`), which counts training only. A run started with `resume=True`
loads the latest checkpoint of `out` and continues exactly as the uninterrupted run would have: same
weights, optimizer moments, learning rate, RNG and samples. A run started with `init` (a training folder,
a checkpoint folder or its weights file, of the same spec) starts from those weights instead of fresh ones,
with a fresh optimizer and schedule: a curriculum, e.g. 2-hop HashHop continued from a 1-hop run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ltmdsl.evals import get_task
from ltmdsl.ir import ModelIR
from ltmdsl.train import groups, metrics, schedule, state
from ltmdsl.train.data import TaskData
from ltmdsl.train.loss import answer_loss

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}

#: Settings that change what a run computes; --resume refuses a run whose saved values differ.
RESUME_KEYS = ("task", "options", "steps", "batch", "accum", "lr", "warmup", "clip", "weight_decay",
               "betas", "dtype", "seed", "loss_chunk", "min_lr_ratio")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (see the module docstring). `options` are the task's options (strings parse)."""

    task: str
    out: str
    steps: int
    batch: int = 16
    options: dict = field(default_factory=dict)
    accum: int = 1
    lr: float = 3e-3
    warmup: int = 10
    clip: float = 1.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    min_lr_ratio: float = 0.1
    dtype: str = "fp32"
    seed: int = 0
    loss_chunk: int = 1024
    save_every: int = 0  # 0: only at the end (and at stop_after)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps, to resume later
    resume: bool = False
    init: str | None = None  # start from these weights (a run folder, checkpoint folder or file) on a new run
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "accum", "loss_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer (got {value!r})")
        for name in ("warmup", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a non-negative integer (got {value!r})")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive (got {self.lr})")
        if self.clip < 0 or self.weight_decay < 0:
            raise ValueError("--clip and --weight-decay must be non-negative")
        if self.dtype not in AUTOCAST:
            raise ValueError(f"--dtype must be one of {', '.join(AUTOCAST)} (got {self.dtype!r})")
        if self.init is not None and self.resume:
            raise ValueError("--init starts a new run from a checkpoint's weights and --resume continues a run; "
                             "give one of them")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"--stop-after must be in 1..{self.steps} (got {self.stop_after})")


def task_data(config: TrainConfig) -> TaskData:
    task = get_task(config.task)
    return TaskData(task, task.make_options(**config.options), config.seed, config.batch, config.accum)


def run_record(ir: ModelIR, config: TrainConfig, data: TaskData) -> dict:
    """What run.json holds: the settings --resume compares, plus the model for the reader."""
    record = {k: getattr(config, k) for k in RESUME_KEYS if hasattr(config, k)}
    record["options"] = {k: v for k, v in dataclasses.asdict(data.options).items()}
    record["betas"] = list(config.betas)
    record["spec_hash"] = ir.source_hash
    record["structure_hash"] = ir.structure_hash  # the model itself: a spec edited only in comments resumes
    record["model"] = ir.name
    if config.init is not None:
        record["init"] = str(config.init)  # for the reader; a resumed run starts from its own checkpoint
    return json.loads(json.dumps(record))  # what reading it back gives (tuples become lists)


def check_resume(saved: dict, current: dict, out: str) -> None:
    same = saved.get("spec_hash") == current.get("spec_hash") or (
        saved.get("structure_hash") is not None and saved.get("structure_hash") == current.get("structure_hash"))
    if not same:
        raise state.CheckpointError(f"{out}: the run was trained from another spec (model {saved.get('model')!r}, "
                                    f"source hash {saved.get('spec_hash')}); resume it with that spec")
    differ = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if differ:
        detail = "; ".join(f"{k}: run has {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
        raise state.CheckpointError(f"{out}: cannot resume with different settings ({detail})")


def train(ir: ModelIR, config: TrainConfig,
          until: Callable[[torch.nn.Module, dict], bool] | None = None) -> Iterator[dict]:
    """Train a model of `ir` as `config` says, yielding one metrics dict per optimizer step; stop early
    at the first step where `until(model, record)` is true (see the module docstring)."""
    from ltmdsl.runtime.build import build

    data = task_data(config)
    data.task.tokenizer(data.options).fits(ir.vocab)  # VocabError names both numbers
    out = Path(config.out)
    current = run_record(ir, config, data)
    torch.manual_seed(config.seed)
    model = build(ir, dtype=torch.float32, device=config.device, seed=config.seed)
    optimizer = torch.optim.AdamW(groups.param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=config.betas, eps=1e-8)
    sched = schedule.scheduler(optimizer, config.warmup, config.steps, config.min_lr_ratio)
    start = 0
    if config.resume:
        check_resume(state.read_run(out), current, str(out))
        found = state.latest(out)
        if found is None:
            raise state.CheckpointError(f"{out}: nothing to resume (no checkpoint yet)")
        start, where = found
        if (where / state.DCP).is_dir():
            raise state.CheckpointError(f"{where}: written by a distributed run (--nproc); resume it with --nproc "
                                        "(under any plan)")
        state.load_weights(model, where)
        trainer = state.load_trainer(where)
        if trainer.step != start:
            raise state.CheckpointError(f"{where}: trainer state is at step {trainer.step}, latest.json says {start}")
        try:
            optimizer.load_state_dict(trainer.optimizer)
            sched.load_state_dict(trainer.scheduler)
        except (ValueError, KeyError, RuntimeError) as e:
            raise state.CheckpointError(f"{where}: optimizer state does not match the model ({e})") from None
        torch.set_rng_state(trainer.rng)
        metrics.truncate(out / metrics.METRICS, start)
    else:
        if (out / state.RUN).exists() or (out / state.LATEST).exists():
            raise state.CheckpointError(f"{out}: already holds a training run; pass --resume to continue it "
                                        "or choose another --out")
        if config.init is not None:
            state.load_weights(model, state.model_file(config.init),
                               hint=f"--init needs weights of this spec ({ir.name}, source hash {ir.source_hash})")
        state.write_run(out, current)
    log = metrics.MetricsLog(out)
    autocast = AUTOCAST[config.dtype]
    device_type = torch.device(config.device).type
    params = [p for g in optimizer.param_groups for p in g["params"]]
    stop = config.stop_after or config.steps
    began = time.perf_counter()
    paused = 0.0  # seconds spent in `until`, not training
    try:
        model.train()
        for step in range(start, stop):
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, count = 0.0, 0, 0
            for micro in range(config.accum):
                tokens, mask = data.micro_batch(step, micro, config.device)  # [B, T], [B, T]
                with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
                    result = answer_loss(model, tokens, mask, config.loss_chunk)
                (result.loss / config.accum).backward()
                loss_sum += float(result.loss.detach()) / config.accum
                correct += result.correct
                count += result.count
            norm = torch.nn.utils.clip_grad_norm_(params, config.clip if config.clip > 0 else float("inf"))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            sched.step()
            done = step + 1
            record = {"step": done, "loss": round(loss_sum, 6), "answer_token_acc": round(correct / count, 6),
                      "lr": lr, "grad_norm": round(float(norm), 6),
                      "samples": done * config.batch * config.accum,
                      "seconds": round(time.perf_counter() - began - paused, 3)}
            log.write(record)
            asked = time.perf_counter()
            stopping = until is not None and bool(until(model, record))
            paused += time.perf_counter() - asked
            if (config.save_every and done % config.save_every == 0) or done == stop or stopping:
                state.save(out, model, optimizer, sched, done)
            yield record
            if stopping:
                break
    finally:
        log.close()
    metrics.plot_training(metrics.read(out / metrics.METRICS), out / metrics.PLOT,
                          f"{ir.name} on {config.task} ({', '.join(f'{k}={v}' for k, v in current['options'].items())})")
