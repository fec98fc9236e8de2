"""Distributed checkpoints (torch.distributed.checkpoint): each rank writes its shards, any plan reads.

    save(ranked, optimizer, "ckpt/step-100", step=100)     # collective; atomic (a complete directory or none)
    step = load(ranked, optimizer, "ckpt/step-100")          # under the same plan or another one (resharding)
    export("ckpt/step-100", ir, "model.safetensors")         # one process, no group: the ordinary checkpoint

The state is the model's and the optimizer's state dicts in torch's plan-independent form
(`get_state_dict`: full parameter names, DTensor shards), so DCP reshards on load from whatever plan wrote
them. Beside the shards, `ltmdsl.json` records the model name, its source hash, the step and the plan;
`load` refuses a checkpoint of another spec before reading a tensor. A save goes to a temporary sibling
directory renamed into place by rank 0 after every rank finished, so a rank dying mid-save leaves the
previous checkpoint as it was. ZeRO 1 (the distributed optimizer) keeps its state in flat shards outside
torch's state-dict API; it gives and takes the same plan-independent layout (per-parameter moments keyed by
name: DistributedOptimizer.state_by_name), so its checkpoints reload under any plan and any plan's under it.

Tensor parallelism lays some parameters' rows out apart from their stored rows (a fused projection split by
segments, rank-major; replicated KV heads, repeated: runtime.tensor_parallel.RowLayout). DCP would save and
reshard those tp-side tensors as if their rows were the stored ones, so the state holds them (and their
optimizer moments) in the stored layout instead: gathered whole, reordered, written once (DCP deduplicates a
tensor every rank holds alike), and on load read whole and cut back into this plan's shards. A checkpoint is
then the same whatever plan wrote it; each such tensor is whole on every rank only while it is saved or
loaded, one at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ltmdsl.distributed.plan import describe
from ltmdsl.distributed.step import full_tensor, row_layouts
from ltmdsl.runtime.tensor_parallel import stored_layout, tp_side

INFO = "ltmdsl.json"


class CheckpointError(ValueError):
    """A distributed checkpoint that cannot be written or read here (the message says why)."""


def _names(model) -> dict[int, str]:
    """id(parameter) -> its name, as torch's state-dict API names it (named_parameters, a tied one once)."""
    return {id(p): name for name, p in model.named_parameters()}


def _distributed(optimizer) -> bool:
    """Whether `optimizer` is the distributed optimizer (ZeRO 1; under ep its two halves), whose state is not
    torch's state dict."""
    from ltmdsl.distributed.distributed_optimizer import DistributedOptimizer
    from ltmdsl.distributed.expert_optimizer import ExpertDataParallelOptimizer

    return isinstance(optimizer, (DistributedOptimizer, ExpertDataParallelOptimizer))


def _state(ranked, optimizer, *, template: bool = False):
    """({"model", "optimizer"} state dicts in the plan-independent form, the tp-side shards `_reshard` puts
    back); `template`: for loading into (ZeRO 1's optimizer state as zeros, without gathering it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if _distributed(optimizer):  # ZeRO 1: the same layout, gathered from the flat shards
        model_sd = get_model_state_dict(ranked.model)
        optim_sd = optimizer.state_by_name(_names(ranked.model), template=template)
    else:
        model_sd, optim_sd = get_state_dict(ranked.model, optimizer)
    shards = {}  # (parameter, None or its moment's key) -> this plan's tensor, for each entry stored re-laid
    for name, layout in row_layouts(ranked.model).items():  # the same order on every rank (collectives)
        shards[(name, None)] = model_sd[name]
        model_sd[name] = stored_layout(full_tensor(model_sd[name]).detach(), layout)
        moments = optim_sd["state"].get(name, {})
        for key, value in moments.items():
            if isinstance(value, torch.Tensor) and value.shape == shards[(name, None)].shape:  # not `step`
                shards[(name, key)] = value
                moments[key] = stored_layout(full_tensor(value).detach(), layout)
    return {"model": model_sd, "optimizer": optim_sd}, shards


def _reshard(state: dict, shards: dict, layouts: dict) -> None:
    """Put every stored-layout entry of a loaded `state` back as this plan's tensor (`_state`'s shards)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for (name, moment), like in shards.items():
        holder, key = (state["model"], name) if moment is None else (state["optimizer"]["state"][name], moment)
        full = tp_side(holder[key], layouts[name]).to(like.dtype)  # this plan's tp-side rows, whole
        holder[key] = (distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
                       if isinstance(like, DTensor) else full)


def save(ranked, optimizer, path: str | os.PathLike, *, step: int) -> Path:
    """Write this rank's shards of model and optimizer to directory `path` (every rank calls it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    state, _ = _state(ranked, optimizer)
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    if dist.get_rank() == 0:
        ir = ranked.model.ir
        info = {"model": ir.name, "source_hash": ir.source_hash, "structure_hash": ir.structure_hash, "step": step,
                "plan": describe(ranked.plan)}
        (tmp / INFO).write_text(json.dumps(info, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()
    return path


def read_info(path: str | os.PathLike, ir) -> dict:
    """The checkpoint's ltmdsl.json, checked against model `ir`; CheckpointError when it is not one of its."""
    info_path = Path(path) / INFO
    if not info_path.is_file():
        raise CheckpointError(f"{path}: not a complete ltmdsl distributed checkpoint (no {INFO})")
    info = json.loads(info_path.read_text())
    if not ir.is_model_of(info.get("source_hash"), info.get("structure_hash")) or info.get("model") != ir.name:
        raise CheckpointError(f"{path}: a checkpoint of model '{info.get('model')}' (spec hash "
                              f"{str(info.get('source_hash'))[:12]}), not of model '{ir.name}' (spec hash "
                              f"{ir.source_hash[:12]})")
    return info


def load(ranked, optimizer, path: str | os.PathLike) -> int:
    """Fill this rank's model and optimizer shards from `path`, written under any plan; returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    info = read_info(path, ranked.model.ir)
    state, shards = _state(ranked, optimizer, template=True)
    dcp.load(state, checkpoint_id=str(path))
    _reshard(state, shards, row_layouts(ranked.model))
    if _distributed(optimizer):
        set_model_state_dict(ranked.model, state["model"])
        optimizer.load_state_by_name(state["optimizer"], _names(ranked.model))
    else:
        set_state_dict(ranked.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return int(info["step"])


def export(path: str | os.PathLike, ir, out: str | os.PathLike) -> Path:
    """The weights of distributed checkpoint `path` as the ordinary single-file checkpoint `out`
    (runtime/checkpoint.py), in one process without a process group."""
    import torch.distributed.checkpoint as dcp

    from ltmdsl.runtime import checkpoint
    from ltmdsl.runtime.build import build

    read_info(path, ir)
    model = build(ir, init=False)
    state = {"model": dict(model.state_dict())}
    with warnings.catch_warnings():  # called inside a group too (train --nproc): no_dist is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])
    return checkpoint.save(model, out)
