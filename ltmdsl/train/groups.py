"""AdamW parameter groups: weight decay only on the matrices a layer multiplies its input by.

The decision is made from each parameter's role as its state-dict name and shape declare it, never from a
list of layer kinds, so a new kind is grouped correctly without touching this module:

- vectors (ndim < 2) never decay: norm scales, biases, Mamba's `D`, `dt_bias` and Mamba-2's `A_log` [Hs];
- log-parametrised tensors (name ending in `_log`, e.g. Mamba-1's `A_log` [Di, N]) never decay: shrinking
  log A towards 0 would move every decay rate towards exp(-1), a change of dynamics, not a regulariser;
- a parameter whose module marks it `p._no_weight_decay = True` (the convention of state-spaces/mamba)
  never decays;
- everything else (projections, conv filters, embeddings, expert matrices) decays.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Groups:
    """Parameter names in each group, in `named_parameters()` order (tied parameters once)."""

    decay: tuple[str, ...]
    no_decay: tuple[str, ...]


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether the parameter called `name` (a state-dict name) should get weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    if getattr(param, "_no_weight_decay", False):
        return False
    if param.ndim < 2:
        return False
    return not leaf.endswith("_log")


def split(model: nn.Module) -> Groups:
    """The decay / no-decay split of `model`'s trainable parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(name)
    return Groups(tuple(decay), tuple(no_decay))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The two AdamW groups of `model` (an empty group is left out)."""
    params = dict(model.named_parameters())
    groups = split(model)
    out = []
    if groups.decay:
        out.append({"params": [params[n] for n in groups.decay], "weight_decay": weight_decay})
    if groups.no_decay:
        out.append({"params": [params[n] for n in groups.no_decay], "weight_decay": 0.0})
    return out
