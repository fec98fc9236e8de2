"""Warmup then cosine: linear to the peak, cosine down to min_ratio at the last step."""

import math

import pytest
import torch

from ltmdsl.train.schedule import lr_factor, scheduler


def test_warmup_is_linear_and_reaches_the_peak():
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_ends_at_the_floor_and_falls_monotonically():
    values = [lr_factor(s, 4, 20, 0.1) for s in range(4, 21)]
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))
    mid = lr_factor(12, 4, 20, 0.1)  # half way through the decay
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_scheduler_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = scheduler(opt, warmup=2, total=10)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [1.0, 2.0, pytest.approx(2.0 * lr_factor(2, 2, 10))]
