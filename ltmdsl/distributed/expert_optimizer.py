"""ZeRO 1 under expert parallelism: the distributed optimizer twice, dense and expert parameters each sharded
over the ranks that hold them (Megatron-LM's distributed optimizer with expert data parallelism).

    opt = ExpertDataParallelOptimizer(groups, expert_ids, dense_group, expert_group, lr=1e-3)

Dense parameters are replicated over the dp x cp ranks, so their AdamW state is cut into dp*cp contiguous
shards over those ranks; an expert parameter exists only on the edp x cp ranks holding its experts
(expert_parallel.py), so its state is cut over those, dp*cp/ep of them. One flat index over both would give a
rank state for elements it does not hold. Each half is `DistributedOptimizer` (a plain AdamW when its group is
one rank); parameter groups keep their hyper-parameters (a group's dense and expert parameters each go to their
half, a half keeping the groups it has parameters of). Checkpoints see one optimizer in the single-process layout
(`state_by_name` / `load_state_by_name`, as DistributedOptimizer's): per-parameter moments by name and the
original parameter groups, so a run saved under ep x ZeRO 1 resumes under any plan and any plan's under it.
"""

from __future__ import annotations

import torch

from ltmdsl.distributed.distributed_optimizer import DistributedOptimizer, _step_dtype


def _half(groups: list[dict], group, **defaults):
    """The distributed optimizer over `group` (AdamW when it is one rank) for `groups`; None for no groups."""
    import torch.distributed as dist

    if not groups:
        return None
    if dist.get_world_size(group) == 1:
        return torch.optim.AdamW(groups, **defaults)
    return DistributedOptimizer(groups, group, **defaults)


class ExpertDataParallelOptimizer:
    """AdamW whose dense and expert states are sharded over their own replica groups (module docstring)."""

    def __init__(self, params, expert_ids: set[int], dense_group, expert_group, **defaults):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        dense, expert = [], []
        origin: list[list[int]] = [[], []]  # per half, the original group each of its groups came from
        for i, g in enumerate(groups):
            rest = {k: v for k, v in g.items() if k != "params"}
            for half, (out, mine) in enumerate(((dense, False), (expert, True))):
                ps = [p for p in g["params"] if (id(p) in expert_ids) == mine]
                if ps:
                    out.append({**rest, "params": ps})
                    origin[half].append(i)
        self._params = [list(g["params"]) for g in groups]  # the original groups' parameters, in order
        # every rank holds the same groups of both halves (same model, same classes), so the collectives match
        built = [(_half(dense, dense_group, **defaults), origin[0]), (_half(expert, expert_group, **defaults), origin[1])]
        self.halves = [h for h, _ in built if h is not None]
        self._origin = [o for h, o in built if h is not None]
        self._scheduled = None

    @property
    def param_groups(self) -> list[dict]:
        return [g for h in self.halves for g in h.param_groups]

    @property
    def state(self) -> dict:
        """Both halves' per-parameter state (their keys are distinct tensors)."""
        return {k: v for h in self.halves for k, v in h.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for h in self.halves:
            h.zero_grad(set_to_none=set_to_none)

    def scheduled(self) -> torch.optim.Optimizer:
        """Both halves' parameter groups as one torch optimizer, the one an lr scheduler drives (it sets each
        group's lr and wraps this one's step, which `step` goes through)."""
        if self._scheduled is None:
            self._scheduled = _Groups(self)
        return self._scheduled

    @torch.no_grad()
    def step(self) -> None:
        """Each half steps its shard and gathers its own parameters (gradients already averaged)."""
        self.scheduled().step()

    def _step_halves(self) -> None:
        for h in self.halves:
            h.step()

    # ---- checkpoints: one optimizer in the single-process layout ----

    @torch.no_grad()
    def state_by_name(self, names: dict[int, str], *, template: bool = False) -> dict:
        """Both halves' state keyed by parameter name, in the original parameter groups (a collective over
        each half's group). `template`: zeros to load into."""
        state: dict = {}
        hyper: dict[int, dict] = {}
        for h, origin in zip(self.halves, self._origin):
            part = h.state_by_name(names, template=template) if isinstance(h, DistributedOptimizer) else \
                _plain_state(h, names, template)
            state.update(part["state"])
            for i, g in zip(origin, part["param_groups"]):
                hyper.setdefault(i, {k: v for k, v in g.items() if k != "params"})
        groups = [{**hyper[i], "params": [names[id(p)] for p in ps]} for i, ps in enumerate(self._params)]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_by_name(self, loaded: dict, names: dict[int, str]) -> None:
        """Each half keeps its parameters' entries of `loaded` and its groups' hyper-parameters."""
        for h, origin in zip(self.halves, self._origin):
            part = {"state": loaded["state"], "param_groups": [loaded["param_groups"][i] for i in origin]}
            if isinstance(h, DistributedOptimizer):
                h.load_state_by_name(part, names)
            else:
                _plain_load(h, part, names)


class _Groups(torch.optim.Optimizer):
    """The halves' own parameter groups (the same dicts) under one torch optimizer, for an lr scheduler."""

    def __init__(self, owner: ExpertDataParallelOptimizer):
        super().__init__(owner.param_groups, {})
        self._owner = owner

    @torch.no_grad()
    def step(self, closure=None):
        self._owner._step_halves()


def _plain_state(optim: torch.optim.Optimizer, names: dict[int, str], template: bool) -> dict:
    """A one-rank half (torch's AdamW) in the single-process layout: moments shaped like the parameters (zeros
    for a parameter without state yet, or for a template)."""
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if any(g.get("amsgrad") for g in optim.param_groups) else [])
    state = {}
    for g in optim.param_groups:
        for p in g["params"]:
            mine = {} if template else optim.state.get(p, {})
            entry = {"step": torch.as_tensor(mine.get("step", 0.0), dtype=_step_dtype()).detach().clone()}
            for key in keys:
                value = mine.get(key)
                entry[key] = torch.zeros_like(p) if value is None else value.detach().clone()
            state[names[id(p)]] = entry
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optim.param_groups]
    return {"state": state, "param_groups": groups}


def _plain_load(optim: torch.optim.Optimizer, loaded: dict, names: dict[int, str]) -> None:
    for mine, theirs in zip(optim.param_groups, loaded["param_groups"]):
        mine.update({k: v for k, v in theirs.items() if k != "params"})
        for p in mine["params"]:
            entry = loaded["state"][names[id(p)]]
            optim.state[p] = {k: (torch.as_tensor(v).detach().clone().to(_step_dtype()) if k == "step"
                                  else v.detach().clone()) for k, v in entry.items()}
