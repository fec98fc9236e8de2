"""What a layer kind needs from tensor parallelism inside its own forward (Megatron-LM's regions, on DTensor).

    local(p)               this rank's shard of a DTensor weight (differentiably); a plain tensor as it is
    copy_to_tp(x, group)   identity forward, gradient summed over the tp ranks in backward (Megatron's "f"):
                           for a replicated tensor that each rank consumes only in part
    sum_over_tp(x, mesh)   the sum of the ranks' partial outputs, on every rank (Megatron's "g"), through
                           DTensor Partial -> Replicate, so backward hands each rank the whole gradient
    shard_parameters(dims) a ParallelStyle splitting a module's parameters along `dims` (a per-channel norm
                           weight whose channels follow the heads; the experts' widths) and recording the
                           mesh as `module.tp_mesh`
    mark_tp()              the same with nothing split: a replicated module whose forward must know the mesh

The kinds' `tp_plan` (runtime/kinds/<kind>.py) combine these with torch's ColwiseParallel / RowwiseParallel.
"""

from __future__ import annotations

import torch


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor-parallel (DTensor) weight, differentiably; a plain tensor as it is."""
    return p.to_local() if hasattr(p, "to_local") else p


class _CopyToTp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """x unchanged; in backward its gradient is summed over the tp ranks of `group`."""
    return _CopyToTp.apply(x, group)


def sum_over_tp(partial: torch.Tensor, mesh) -> torch.Tensor:
    """The sum of every tp rank's partial tensor, on every rank (backward: each rank gets the whole grad)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor.from_local(partial, mesh, [Partial()]).redistribute(mesh, [Replicate()]).to_local()


def shard_parameters(dims: int | dict[str, int] = 0):
    """A torch ParallelStyle that splits the module's own parameters over the tp mesh, every one along `dims`
    or each named one along `dims[name]` (the others stay replicated), and records the mesh as
    `module.tp_mesh`; the module's forward then reads `local(p)`."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class ShardParameters(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh):
            for name, p in list(module.named_parameters(recurse=False)):
                dim = dims if isinstance(dims, int) else dims.get(name)
                if dim is not None:
                    setattr(module, name, nn.Parameter(distribute_tensor(p, device_mesh, [Shard(dim)]),
                                                       requires_grad=p.requires_grad))
            module.tp_mesh = device_mesh
            return module

    return ShardParameters()


def mark_tp():
    """A torch ParallelStyle that keeps the module replicated and records the tp mesh as `module.tp_mesh`."""
    return shard_parameters({})
