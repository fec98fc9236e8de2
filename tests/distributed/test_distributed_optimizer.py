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


def _state_by_name_and_resume():
    """3 steps, the state in the single-process layout; then a fresh optimizer on other weights loads it and the
    weights, and steps once more."""
    import torch.distributed as dist

    from ltmdsl.distributed.distributed_optimizer import DistributedOptimizer

    params = _params()
    names = {id(p): f"p{i}" for i, p in enumerate(params)}
    opt = DistributedOptimizer(_groups(params), dist.group.WORLD, lr=0.05, betas=(0.8, 0.9))
    weights = _run(opt, params)
    state = opt.state_by_name(names)
    fresh = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    resumed = DistributedOptimizer(_groups(fresh), dist.group.WORLD, lr=0.5, betas=(0.8, 0.9))  # lr from the state
    template = resumed.state_by_name({id(p): f"p{i}" for i, p in enumerate(fresh)}, template=True)
    assert all(torch.count_nonzero(m) == 0 for s in template["state"].values() for m in s.values())
    resumed.load_state_by_name(state, {id(p): f"p{i}" for i, p in enumerate(fresh)})
    with torch.no_grad():
        for p, w in zip(fresh, weights):
            p.copy_(w)
    for p, g in zip(fresh, _grads(STEPS)):
        p.grad = g.clone()
    resumed.step()
    return state, [p.detach().clone() for p in fresh]


def test_state_by_name_is_adamw_state_and_resumes_it():
    """On 3 ranks (uneven shards): the gathered state equals torch.optim.AdamW's after 3 steps, keyed by name,
    with its groups' hyper-parameters (float64, 1e-12); loaded into a fresh distributed optimizer, a 4th step
    gives AdamW's 4th-step weights."""
    params = _params()
    adamw = torch.optim.AdamW(_groups(params), lr=0.05, betas=(0.8, 0.9))
    _run(adamw, params)
    want_state = {f"p{i}": {k: v.clone() for k, v in adamw.state[p].items()} for i, p in enumerate(params)}
    for p, g in zip(params, _grads(STEPS)):
        p.grad = g.clone()
    adamw.step()
    for state, weights in launch(_state_by_name_and_resume, 3):
        assert set(state["state"]) == set(want_state)
        for name, want in want_state.items():
            assert float(state["state"][name]["step"]) == float(want["step"]) == STEPS
            for key in ("exp_avg", "exp_avg_sq"):
                assert_close(state["state"][name][key], want[key], 1e-12, f"{key} of {name}")
        assert [g["params"] for g in state["param_groups"]] == [["p0", "p1"], ["p2", "p3"]]
        assert [g["weight_decay"] for g in state["param_groups"]] == [0.1, 0.0]
        for got, ref in zip(weights, params):
            assert_close(got, ref, 1e-12, "weights after the resumed 4th step")
