"""Which samples each step trains on: a pure function of the data seed, the step and the micro-batch.

Micro-batch m of optimizer step s holds samples `(s * accum + m) * batch + i` for i < batch, drawn with
`ltmdsl.evals.make_batch`, whose samples depend only on `(seed, index)`. The data position of a run is
therefore just its step: a resumed run asks for exactly the samples an uninterrupted one would, and no
sample is ever seen twice. Evaluation uses another seed (`EVAL_SEED`), an independent stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ltmdsl.evals import Task, make_batch

#: The default seed of evaluation samples: a stream no training run with a small seed draws from.
EVAL_SEED = 2**31 - 1


@dataclass(frozen=True)
class TaskData:
    """The training stream of `task` under `options`: `batch` samples per micro-batch, `accum` per step."""

    task: Task
    options: Any
    seed: int
    batch: int
    accum: int = 1

    def first_index(self, step: int, micro: int) -> int:
        return (step * self.accum + micro) * self.batch

    def micro_batch(self, step: int, micro: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T] int64, answer_mask [B, T] bool) of micro-batch `micro` of step `step`."""
        start = self.first_index(step, micro)
        b = make_batch(self.task, self.options, self.seed, range(start, start + self.batch))
        return (torch.from_numpy(b.tokens).to(device),  # [B, T]
                torch.from_numpy(b.answer_mask.copy()).to(device))  # [B, T]


def repeated_samples_warning(task: str, options: dict, seed: int, init_run: dict) -> str | None:
    """A warning when a run started from `--init` would train on samples its source run already drew.

    A run's samples are a function of its task, options, seed and step only, so a second stage of the same
    task, options and seed begins again at sample 0: a curriculum stage meant to add data would repeat it.
    `init_run` is the source run's record (its run.json), empty when the weights came without one."""
    if init_run.get("task") != task or init_run.get("seed") != seed or init_run.get("options") != options:
        return None
    seen = init_run.get("steps", 0) * init_run.get("batch", 0) * init_run.get("accum", 1)
    return (f"--init's run trained on the first {seen:,} samples of this task, options and seed {seed}; this "
            f"run draws the same samples again from sample 0 (pass another --seed to train on new ones)")
