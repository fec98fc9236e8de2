"""The distributed optimizer (ZeRO 1) on 3 forked gloo ranks: parameters of odd sizes in two groups (weight
decay on one), P = 95 elements not divisible by 3, the same gradients on every rank (as after the gradient
all-reduce). Three steps leave every rank's weights equal to torch.optim.AdamW's in one process (float64,
1e-12 relative: the same element-wise arithmetic, so only summation-free rounding could differ), and each
rank holds AdamW state for its contiguous shard only: ceil(95/3) = 32, 32 and 31 elements."""

from __future__ import annotations

import torch
from helpers import assert_close

from ltmdsl.distributed import launch

SHAPES = [(5, 7), (11,), (3, 4, 3), (13,)]  # 35 + 11 + 36 + 13 = 95 elements
STEPS = 3


def _params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def _run(optimizer, params):
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, _grads(step)):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach().clone() for p in params]


def _rank():
    import torch.distributed as dist

    from ltmdsl.distributed.distributed_optimizer import DistributedOptimizer

    params = _params()
    opt = DistributedOptimizer(_groups(params), dist.group.WORLD, lr=0.05, betas=(0.8, 0.9))
    weights = _run(opt, params)
    state = sum(v.numel() for s in opt.state.values() for k, v in s.items() if k != "step")
    return weights, state


def test_sharded_adamw_equals_adamw_and_holds_its_shard():
    params = _params()
    want = _run(torch.optim.AdamW(_groups(params), lr=0.05, betas=(0.8, 0.9)), params)
    results = launch(_rank, 3)
    assert [state for _, state in results] == [2 * 32, 2 * 32, 2 * 31]  # exp_avg and exp_avg_sq of the shard
    for weights, _ in results:
        for got, ref in zip(weights, want):
            assert_close(got, ref, 1e-12, "weights after 3 steps")
