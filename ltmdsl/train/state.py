"""The run folder and its checkpoints, written atomically so a crash never leaves half a checkpoint.

    DIR/run.json                          the run's configuration (what --resume must match)
    DIR/checkpoints/step-00000100/        one checkpoint per save, each written whole (ltmdsl.atomic.directory)
        model.safetensors                 weights + the spec text (ltmdsl.runtime.checkpoint)
        trainer.pt                        optimizer, scheduler, torch RNG, step (the data position)
        dcp/                              a distributed run's (--nproc) model and optimizer shards
                                          (torch.distributed.checkpoint; its trainer.pt holds no optimizer)
    DIR/latest.json                       {"step": 100, "checkpoint": "checkpoints/step-00000100"}, replaced
                                          atomically after the checkpoint folder is in place
    DIR/metrics.jsonl, DIR/training.png   (ltmdsl.train.metrics)

The data position is the step: samples are a pure function of (seed, step) (ltmdsl.train.data).
`trainer.pt` is read with `torch.load(weights_only=True)`, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ltmdsl import atomic
from ltmdsl.runtime import checkpoint as weights
from ltmdsl.tensorfile import TensorFileError, read_header

RUN = "run.json"
LATEST = "latest.json"
CHECKPOINTS = "checkpoints"
MODEL = "model.safetensors"
TRAINER = "trainer.pt"
DCP = "dcp"


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be resumed or evaluated; the message says which file and why."""


@dataclass(frozen=True)
class TrainerState:
    """Everything besides the weights that a resumed run needs to continue bit for bit."""

    step: int  # optimizer steps done = the data position
    optimizer: dict
    scheduler: dict
    rng: torch.Tensor


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:08d}"


def save(folder: str | os.PathLike, model, optimizer, scheduler, step: int) -> Path:
    """Write checkpoint `step` of the run in `folder` whole, then point latest.json at it."""
    folder = Path(folder)
    rel = checkpoint_name(step)
    (folder / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    with atomic.directory(folder / rel) as tmp:
        weights.save(model, tmp / MODEL)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / TRAINER)
    atomic.write_text(folder / LATEST, json.dumps({"step": step, "checkpoint": rel}) + "\n")
    return folder / rel


def write_run(folder: str | os.PathLike, config: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / RUN, json.dumps(config, indent=1, sort_keys=True) + "\n")


def read_run(folder: str | os.PathLike) -> dict:
    path = Path(folder) / RUN
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a training run (no {RUN})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def latest(folder: str | os.PathLike) -> tuple[int, Path] | None:
    """(step, checkpoint folder) of the run's latest checkpoint; None when it has none yet."""
    folder = Path(folder)
    path = folder / LATEST
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        step, rel = int(record["step"]), str(record["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if rel != checkpoint_name(step):
        raise CheckpointError(f"{path}: names {rel!r} for step {step}; expected {checkpoint_name(step)!r}")
    where = folder / rel
    if not (where / MODEL).is_file() or not (where / TRAINER).is_file():
        raise CheckpointError(f"{where}: the checkpoint latest.json names is missing {MODEL} or {TRAINER}")
    return step, where


def model_file(run: str | os.PathLike) -> Path:
    """The weights file of RUN: a training folder (its latest checkpoint), a checkpoint folder or a file."""
    run = Path(run)
    if run.is_file():
        return run
    if (run / MODEL).is_file():
        return run / MODEL
    if (run / RUN).is_file() or (run / LATEST).exists():
        found = latest(run)
        if found is None:
            raise CheckpointError(f"{run}: the run has no checkpoint yet")
        return found[1] / MODEL
    if not run.exists():
        raise CheckpointError(f"{run}: no such file or folder")
    raise CheckpointError(f"{run}: neither a checkpoint file nor a training folder (no {LATEST} or {MODEL})")


def load_weights(model, checkpoint: Path, hint: str = "resume with the spec the run was started with") -> None:
    """Fill `model` with the weights of `checkpoint/model.safetensors` (or of `checkpoint` itself when it is
    the weights file), checking they come from its spec; `hint` ends the message when they do not."""
    path = checkpoint if checkpoint.is_file() else checkpoint / MODEL
    try:
        header = read_header(path)
    except (TensorFileError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    source = header.metadata.get("ltmdsl.source_hash")
    if not model.ir.is_model_of(source, header.metadata.get("ltmdsl.structure_hash")):
        raise CheckpointError(f"{path}: trained from another spec (source hash {source}, this spec's "
                              f"{model.ir.source_hash}); {hint}")
    try:
        loaded = weights.load(path, model.ir, stored_dtype=model.dtype, header=header)
    except (TensorFileError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: does not match the model ({e})") from None
    with torch.no_grad():
        for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
            p.copy_(q)


def load_trainer(checkpoint: Path) -> TrainerState:
    path = checkpoint / TRAINER
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return TrainerState(step=int(raw["step"]), optimizer=raw["optimizer"], scheduler=raw["scheduler"],
                            rng=raw["rng"])
    except Exception as e:  # torch.load raises many types for a damaged file (pickle, zip, EOF)
        raise CheckpointError(f"{path}: corrupt trainer state ({type(e).__name__}: {e})") from None
