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
    segmented(style, segs) a style whose Shard(0) split is of a fused tensor (Mamba-2's in_proj holds z, x, B,
                           C and dt): each rank takes its 1/t of every segment (Megatron-LM's split), not one
                           contiguous block of rows (below)
    tp_size(module)        the tp degree a module was split over (1 when it was not)
    rmsnorm_over_tp(...)   an RMSNorm over a width whose channels are split over tp: the sum of squares
                           all-reduced (lightning's norm over all heads at once)

A fused parameter keeps its name and its stored layout (the one checkpoints and the Hugging Face mapping
share). Under tp its DTensor is Shard(0) of the rank-major reordering of its rows (rank 0's part of every
segment, then rank 1's, ...), so each rank's local shard is [z_r, x_r, B_r, C_r, dt_r] and torch's
ColwiseParallel, FSDP2 and the optimizer work on it unchanged. `segment_order` is that reordering: the
seeded init draws in the stored layout and `runtime.initializers.assign_` reorders by it; `stored_layout`
turns a full (gathered) tensor back. The module records `tp_segments = {parameter: (sizes, t)}`.

The kinds' `tp_plan` (runtime/kinds/<kind>.py) combine these with torch's ColwiseParallel / RowwiseParallel;
the plan's key "" names the mixer itself (its own parameters: Mamba-2's A_log, D and dt_bias).
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


def segment_order(sizes: tuple[int, ...], t: int) -> torch.Tensor:
    """Rows of a fused tensor with segments of `sizes` (each divisible by t) in tp order: rank 0's 1/t of
    every segment, then rank 1's, ... (index into the stored layout)."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = [torch.arange(start + r * (n // t), start + (r + 1) * (n // t))
            for r in range(t) for start, n in zip(starts, sizes)]
    return torch.cat(rows)


def stored_layout(full: torch.Tensor, segments: tuple[tuple[int, ...], int]) -> torch.Tensor:
    """A gathered fused tensor (tp order along dim 0) back in its stored layout; `segments` = (sizes, t)."""
    order = segment_order(*segments).to(full.device)
    out = torch.empty_like(full)
    out[order] = full
    return out


def segmented(style, segments: dict[str, tuple[int, ...]]):
    """`style` (ColwiseParallel, shard_parameters(0)) applied to a module whose parameters named in
    `segments` are fused along dim 0 from segments of those sizes: records `module.tp_segments`, so that
    each rank holds its 1/t of every segment (module docstring). Every size must be divisible by t."""
    from torch.distributed.tensor.parallel import ParallelStyle

    class Segmented(ParallelStyle):
        fused = segments  # what ltmdsl.train.parallel.check looks for (no DCP checkpoint of these under tp yet)

        def _apply(self, module, device_mesh):
            t = device_mesh.size()
            bad = {name: sizes for name, sizes in segments.items() if any(n % t for n in sizes)}
            if bad:
                raise ValueError(f"tp = {t} does not divide the segments {bad}")
            module = style._apply(module, device_mesh)
            names = dict(module.named_parameters(recurse=False))
            module.tp_segments = {name: (tuple(sizes), t) for name, sizes in segments.items() if name in names}
            return module

    return Segmented()


def tp_size(module) -> int:
    """The tp degree `module` was split over (its recorded `tp_mesh`), 1 when it was not."""
    mesh = getattr(module, "tp_mesh", None)
    return 1 if mesh is None else mesh.size()


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


def rmsnorm_over_tp(x: torch.Tensor, weight: torch.Tensor, eps: float, mesh) -> torch.Tensor:
    """x [..., W/t] (this rank's channels of a W-wide RMSNorm) -> weight * x / sqrt(mean over all W of x^2 +
    eps), as runtime.ops_norm.rmsnorm computes it whole (fp32 statistics, fp64 kept). The rank's sum of
    squares is summed over the tp ranks; its gradient, which every rank's channels feed, summed back."""
    dtype = x.dtype
    xf = x.float() if dtype != torch.float64 else x  # [..., W/t]
    squares = sum_over_tp(xf.pow(2).sum(-1, keepdim=True), mesh)  # [..., 1]: over all W channels
    squares = copy_to_tp(squares, mesh.get_group())
    xf = xf * torch.rsqrt(squares / (xf.shape[-1] * mesh.size()) + eps)
    return local(weight) * xf.to(dtype)
