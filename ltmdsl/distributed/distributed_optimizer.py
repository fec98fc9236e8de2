"""ZeRO-1 as Megatron-LM's distributed optimizer: optimizer state sharded over the replicas, gradients
all-reduced, updated weights all-gathered.

    opt = DistributedOptimizer(model.parameters(), replica_group, lr=1e-3)   # or parameter groups
    ... backward; sync_gradients (every replica holds the averaged gradient) ...
    opt.step()                                                               # then every rank's weights agree

The rank's local parameters (a DTensor's local shard under tensor parallelism, each stage's own under pipeline
parallelism) are laid end to end in one flat index of P elements, cut into N contiguous shards of
S = ceil(P/N) elements (Megatron's contiguous grad-buffer split, Rajbhandari et al. 2020, ZeRO stage 1).
Rank r keeps AdamW state only for elements [r*S, (r+1)*S): each parameter it touches contributes a view of its
flattened storage, and an inner `torch.optim.AdamW` steps those views in place (AdamW is element-wise, so
stepping pieces is stepping the whole). The shards then travel by one all-gather of N*S elements, and every
rank copies the whole flat back into its parameters. Per rank the optimizer state is S*o bytes: P*o/N exactly
when N divides P, as the memory model predicts.

Unlike torch's ZeroRedundancyOptimizer, which assigns whole parameters to ranks (so one rank's state is only
near P*o/N, and it cannot broadcast DTensor parameters), this works on any local tensors, so it runs under
tensor and pipeline parallelism alike. Parameter groups keep their own hyper-parameters (a piece goes to its
parameter's group).

Checkpoints: `state_by_name` gives the state in the single-process layout, the one torch's `get_state_dict`
gives for a plain AdamW ({"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}, each
moment shaped like its parameter, a DTensor with the parameter's placements under tp), so a distributed
checkpoint written under ZeRO 1 reloads under any plan and any plan's under ZeRO 1 (`load_state_by_name`
keeps this rank's pieces of it). The moments travel by one all-gather of N*S elements each, as the weights do
after a step (Megatron-LM likewise gathers its distributed optimizer's shards for a checkpoint): while it is
saved or loaded a rank holds its parameters' whole moments, what ZeRO 0 holds all the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (sharing its storage), or t itself, detached."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach()


def _step_dtype() -> torch.dtype:
    """The dtype of AdamW's step counter: float64 when that is the default dtype, else float32 (as torch.optim's
    own state)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@dataclass(frozen=True)
class Piece:
    """The elements [start, stop) of one parameter's flattened local tensor that this rank's optimizer owns."""

    param: torch.Tensor  # the parameter (a DTensor or a plain tensor)
    start: int
    stop: int
    view: torch.Tensor  # [stop - start] view of the parameter's local storage, stepped in place


class DistributedOptimizer:
    """AdamW with its state sharded contiguously over `group` (module docstring)."""

    def __init__(self, params, group, *, optimizer_class=torch.optim.AdamW, **defaults):
        import torch.distributed as dist

        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.params: list[torch.Tensor] = [p for g in groups for p in g["params"]]
        for p in self.params:
            if not _local(p).is_contiguous():
                raise ValueError("the distributed optimizer needs contiguous parameters")
        dtypes = {_local(p).dtype for p in self.params}
        if len(dtypes) > 1:
            raise ValueError(f"the distributed optimizer's flat buffer holds one dtype, got {sorted(map(str, dtypes))}")
        self.numel = sum(_local(p).numel() for p in self.params)  # P: this rank's local elements
        self.shard = math.ceil(self.numel / self.size)  # S
        lo, hi = self.rank * self.shard, min((self.rank + 1) * self.shard, self.numel)
        self.pieces: list[Piece] = []
        inner_groups = []
        offset = 0
        self._group_sizes = [len(g["params"]) for g in groups]
        for g in groups:
            pieces = []
            for p in g["params"]:
                n = _local(p).numel()
                a, b = max(lo, offset), min(hi, offset + n)
                if a < b:
                    flat = _local(p).view(-1)  # [n], the parameter's storage
                    pieces.append(Piece(p, a - offset, b - offset, flat[a - offset:b - offset]))
                offset += n
            self.pieces += pieces
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [x.view for x in pieces]})
        # a rank owning nothing of a group still keeps the group (same param_groups on every rank)
        self.optim = optimizer_class(inner_groups, **defaults)

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's pieces (gradients already averaged over the group), then the all-gather."""
        import torch.distributed as dist

        for x in self.pieces:
            grad = x.param.grad
            x.view.grad = None if grad is None else _local(grad).reshape(-1)[x.start:x.stop]  # [stop - start]
        self.optim.step()
        for x in self.pieces:
            x.view.grad = None
        if self.size == 1:
            return
        first = _local(self.params[0])
        mine = torch.zeros(self.shard, dtype=first.dtype, device=first.device)  # [S]: this rank's updated elements, padded
        fill = 0
        for x in self.pieces:
            mine[fill:fill + x.view.numel()] = x.view
            fill += x.view.numel()
        shards = [torch.empty_like(mine) for _ in range(self.size)]  # N x [S]
        dist.all_gather(shards, mine, group=self.group)
        flat = torch.cat(shards)  # [N*S]: every rank's updated elements in flat order
        offset = 0
        for p in self.params:
            local = _local(p).view(-1)  # [n]
            local.copy_(flat[offset:offset + local.numel()])
            offset += local.numel()

    # ---- checkpoints: the single-process layout (module docstring) ----

    def _adamw_keys(self) -> list[str]:
        """The per-element state tensors AdamW keeps for these groups: exp_avg, exp_avg_sq (and max_exp_avg_sq
        with amsgrad)."""
        amsgrad = any(g.get("amsgrad") for g in self.optim.param_groups)
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])

    def _moment_keys(self) -> list[str]:
        """The names of the per-element state tensors, agreed by every rank of the group (a rank owning no
        piece, or none stepped yet, learns them from the others; AdamW's when no rank has state yet)."""
        import torch.distributed as dist

        mine = sorted({k for s in self.optim.state.values() for k, v in s.items()
                       if k != "step" and isinstance(v, torch.Tensor) and v.dim() > 0})
        everyone = [None] * self.size
        dist.all_gather_object(everyone, mine, group=self.group)
        keys = sorted({k for ks in everyone for k in ks})
        return keys or self._adamw_keys()

    def _like_param(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """`local` (shaped like p's local tensor) as p is laid out: a DTensor with p's mesh and placements, or
        itself."""
        if not hasattr(p, "to_local"):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    @torch.no_grad()
    def state_by_name(self, names: dict[int, str], *, template: bool = False) -> dict:
        """The optimizer state in the single-process layout, keyed by parameter name (`names`: id(param) ->
        name, as model.named_parameters()). A collective over the group. Every parameter has an entry: one
        whose state never formed (no step yet, no gradient) has zero moments and step 0, which AdamW steps as
        a fresh state. `template`: zeros to load into, without communication."""
        import torch.distributed as dist

        first = _local(self.params[0])
        keys = self._adamw_keys() if template else self._moment_keys()
        # [n_params]: each parameter's step count, on the parameters' device (NCCL reduces device tensors only)
        steps = torch.zeros(len(self.params), dtype=torch.float64, device=first.device)
        step_dtype = _step_dtype()
        flats = {}
        if not template:
            index = {id(p): i for i, p in enumerate(self.params)}
            for x in self.pieces:
                s = self.optim.state.get(x.view, {})
                if "step" in s:
                    steps[index[id(x.param)]] = float(s["step"])
                    step_dtype = s["step"].dtype if isinstance(s["step"], torch.Tensor) else step_dtype
            if self.size > 1:
                dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=self.group)
            for key in keys:
                mine = torch.zeros(self.shard, dtype=first.dtype, device=first.device)  # [S]: this rank's elements
                fill = 0
                for x in self.pieces:
                    value = self.optim.state.get(x.view, {}).get(key)
                    if value is not None:
                        mine[fill:fill + x.view.numel()] = value
                    fill += x.view.numel()
                shards = [torch.empty_like(mine) for _ in range(self.size)]  # N x [S]
                dist.all_gather(shards, mine, group=self.group)
                flats[key] = torch.cat(shards)  # [N*S]: every rank's elements in flat order
        state, offset = {}, 0
        for i, p in enumerate(self.params):
            local = _local(p)
            entry = {"step": torch.tensor(float(steps[i]), dtype=step_dtype)}
            for key in keys:
                whole = (torch.zeros_like(local) if template else
                         flats[key][offset:offset + local.numel()].view(local.shape).clone())  # p's local shape
                entry[key] = self._like_param(p, whole)
            state[names[id(p)]] = entry
            offset += local.numel()
        groups, start = [], 0
        for g in self.optim.param_groups:
            count = self._group_sizes[len(groups)]
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [names[id(p)] for p in self.params[start:start + count]]})
            start += count
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_by_name(self, loaded: dict, names: dict[int, str]) -> None:
        """Keep this rank's pieces of `loaded` (`state_by_name`'s layout, each moment shaped like this plan's
        parameter) and the groups' hyper-parameters (group by group, in order)."""
        for x in self.pieces:
            entry = loaded["state"][names[id(x.param)]]
            state = {"step": torch.as_tensor(entry["step"]).detach().clone().to(_step_dtype())}
            for key, value in entry.items():
                if key != "step":
                    flat = _local(value).reshape(-1)  # [n]: the parameter's local elements, flat
                    state[key] = flat[x.start:x.stop].clone()  # [stop - start]
            self.optim.state[x.view] = state
        for mine, theirs in zip(self.optim.param_groups, loaded["param_groups"]):
            mine.update({k: v for k, v in theirs.items() if k != "params"})
