"""Learning rate: linear warmup from 0 over `warmup` steps, then cosine decay to `min_ratio` of the peak.

A pure function of the step, so a resumed run needs only the step to continue the schedule; the
`LambdaLR` built on it is saved with the optimizer all the same (its state is the step count).
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
              min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` applying `lr_factor` to every group of `optimizer`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, min_ratio))
