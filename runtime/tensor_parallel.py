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
    head_replicas(heads)   a Linear whose output rows are `heads` KV heads, fewer than the tp ranks (MQA, GQA
                           at t > Hkv): each rank holds the one head its query heads use (Megatron-LM's
                           replicated KV heads), the copies' gradients summed (below)
    grouped_segments(...)  `segmented` where some segments are fewer groups than ranks (Mamba-2's B and C at
                           n_groups < t): each rank holds its heads' group of those, the copies' gradients
                           summed over the ranks sharing it (`tp_local`); sum_over_group sums an activation
                           over them (a norm over a group split across those ranks)
    shared_weight(module)  a replicated weight of a tp-marked module whose uses are split over the ranks
                           (a per-head norm's weight shared by heads on different ranks): its gradient summed
    tp_size(module)        the tp degree a module was split over (1 when it was not)
    rmsnorm_over_tp(...)   an RMSNorm over a width whose channels are split over tp: the sum of squares
                           all-reduced (lightning's norm over all heads at once)

**Row layouts.** A parameter keeps its name and its stored layout (the one checkpoints and the Hugging Face
mapping share), but two splits need a tp-side global tensor whose rows are not the stored rows, so that
torch's Shard(0) of it is what each rank holds and ColwiseParallel, FSDP2 and the optimizer work on it
unchanged. Each is a `RowLayout`, recorded by its style as `module.tp_layouts = {parameter: RowLayout}`:

  segments   a fused tensor, rows reordered rank-major (rank 0's part of every segment, then rank 1's, ...),
             so each rank's local shard is [z_r, x_r, B_r, C_r, dt_r] (a permutation of the stored rows);
  replicas   Hkv heads' rows repeated t / Hkv times (rank r holds head r // (t / Hkv)): the tp-side tensor
             has t heads' rows, the stored one Hkv.
  grouped    segments rank-major where some are fewer groups than ranks (`grouped_segments`): those rows
             repeated as replicas are, inside each rank's part.

`RowLayout.rows[i]` is the stored row of tp-side row i. The seeded init draws in the stored layout and
`runtime.initializers.assign_` takes `full[rows]`; `stored_layout` turns a gathered tp-side tensor back (a
replica's copies are equal: their gradients are summed before any update); distributed checkpoints store
the stored layout (ltmdsl.distributed.checkpoint), so they reshard to any plan.

The kinds' `tp_plan` (runtime/kinds/<kind>.py) combine these with torch's ColwiseParallel / RowwiseParallel;
the plan's key "" names the mixer itself (its own parameters: Mamba-2's A_log, D and dt_bias).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class RowLayout:
    """How a parameter's tp-side global rows map to its stored rows (module docstring): `rows[i]` is the
    stored row of tp-side row i; `stored` the stored row count."""

    rows: tuple[int, ...]
    stored: int

    def index(self, device=None) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.long, device=device)

    def stored_shape(self, shape) -> tuple[int, ...]:
        """The stored shape of a parameter whose tp-side shape is `shape`."""
        return (self.stored, *tuple(shape)[1:])

    def row_weights(self) -> torch.Tensor:
        """1 / the copies of each tp-side row's stored row [rows] (float64): a sum over the tp-side rows so
        weighted counts every stored row once (a gradient norm)."""
        index = self.index()
        copies = torch.bincount(index, minlength=self.stored).double()  # [stored]
        return 1.0 / copies[index]  # [rows]


def segment_order(sizes: tuple[int, ...], t: int, groups: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """Rows of a fused tensor with segments of `sizes` (each divisible by t) in tp order: rank 0's 1/t of
    every segment, then rank 1's, ... (index into the stored layout). `groups[i]`, where given and fewer than
    t, makes segment i one of that many groups replicated beyond them: rank r holds group r // (t / groups[i])
    whole (Mamba-2's B and C at n_groups < t), so its rows appear t / groups[i] times."""
    groups = groups or (None,) * len(sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = []
    for r in range(t):
        for start, n, k in zip(starts, sizes, groups):
            if k is not None and k < t:  # one of k groups, rank r's: group r // (t / k)
                g = r // (t // k)
                rows.append(torch.arange(start + g * (n // k), start + (g + 1) * (n // k)))
            else:
                rows.append(torch.arange(start + r * (n // t), start + (r + 1) * (n // t)))
    return torch.cat(rows)


def segments_layout(sizes: tuple[int, ...], t: int, groups: tuple[int | None, ...] | None = None) -> RowLayout:
    """The rank-major layout of a fused tensor of segments `sizes` over t ranks (`groups`: segment_order's)."""
    return RowLayout(tuple(segment_order(sizes, t, groups).tolist()), sum(sizes))


def replicas_layout(heads: int, rows_per_head: int, t: int) -> RowLayout:
    """`heads` heads of `rows_per_head` rows each, repeated so that rank r of t holds head r // (t / heads)."""
    copies = t // heads
    return RowLayout(tuple(h * rows_per_head + i for h in range(heads) for _ in range(copies)
                           for i in range(rows_per_head)), heads * rows_per_head)


def stored_layout(full: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """A gathered tp-side tensor (rows in `layout`'s order) back in its stored layout (a replicated row from
    its last copy: the copies are equal)."""
    out = full.new_empty(layout.stored_shape(full.shape))
    out[layout.index(full.device)] = full
    return out


def tp_side(stored: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """A stored-layout tensor's tp-side rows (what `layout`'s Shard(0) splits)."""
    return stored[layout.index(stored.device)]


def segmented(style, segments: dict[str, tuple[int, ...]]):
    """`style` (ColwiseParallel, shard_parameters(0)) applied to a module whose parameters named in
    `segments` are fused along dim 0 from segments of those sizes: records `module.tp_layouts`, so that
    each rank holds its 1/t of every segment (module docstring). Every size must be divisible by t."""
    from torch.distributed.tensor.parallel import ParallelStyle

    class Segmented(ParallelStyle):
        def _apply(self, module, device_mesh):
            t = device_mesh.size()
            bad = {name: sizes for name, sizes in segments.items() if any(n % t for n in sizes)}
            if bad:
                raise ValueError(f"tp = {t} does not divide the segments {bad}")
            module = style._apply(module, device_mesh)
            names = dict(module.named_parameters(recurse=False))
            layouts = {name: segments_layout(tuple(sizes), t) for name, sizes in segments.items() if name in names}
            module.tp_layouts = {**getattr(module, "tp_layouts", {}), **layouts}
            return module

    return Segmented()


class _SumOverCopies(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks holding the same head (slot) of `slots`,
    through one all-reduce over the tp group (each rank's gradient in its head's slot, zeros elsewhere)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, slot: int, slots: int, group) -> torch.Tensor:
        ctx.slot, ctx.slots, ctx.group = slot, slots, group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum_in_slot(grad, ctx.slot, ctx.slots, ctx.group), None, None, None


def _sum_in_slot(x: torch.Tensor, slot: int, slots: int, group) -> torch.Tensor:
    """The sum of x over the ranks of `group` in the same `slot` (of `slots`), through one all-reduce over the
    group (each rank's x in its slot, zeros elsewhere)."""
    import torch.distributed as dist

    buf = x.new_zeros((slots, *x.shape))  # [slots, ...]
    buf[slot] = x
    dist.all_reduce(buf, group=group)
    return buf[slot]


def head_replicas(heads: int):
    """A ParallelStyle for an nn.Linear whose output rows are `heads` equal heads, fewer than the t tp ranks
    (t a multiple of heads): Megatron-LM's replicated KV heads. Its weight (and bias) become the tp-side
    tensor of `replicas_layout` split Shard(0), so rank r holds head r // (t / heads); the forward reads
    replicated x (its gradient summed over the ranks, as a column-parallel input's is) and sums each weight's
    gradient over the ranks holding the same head, so the copies stay equal and their gradient is the
    single-process one."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class HeadReplicas(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh):
            t = device_mesh.size()
            if t % heads:
                raise ValueError(f"tp = {t} is not a multiple of the {heads} heads to replicate")
            rows = module.weight.shape[0] // heads
            layout = replicas_layout(heads, rows, t)
            module.tp_layouts = {}
            for name, p in list(module.named_parameters(recurse=False)):
                full = (torch.empty((t * rows, *p.shape[1:]), dtype=p.dtype, device=p.device) if p.is_meta
                        else tp_side(p.detach(), layout))  # [t * rows, ...]
                shard = distribute_tensor(full, device_mesh, [Shard(0)], src_data_rank=None)  # [rows, ...] each
                setattr(module, name, nn.Parameter(shard, requires_grad=p.requires_grad))
                module.tp_layouts[name] = layout
            module.tp_mesh = device_mesh
            slot, group = device_mesh.get_local_rank() // (t // heads), device_mesh.get_group()

            def forward(x: torch.Tensor) -> torch.Tensor:
                x = copy_to_tp(x, group)  # [..., in]
                w = _SumOverCopies.apply(local(module.weight), slot, heads, group)  # [rows, in]: this rank's head
                b = None if module.bias is None else _SumOverCopies.apply(local(module.bias), slot, heads, group)
                return torch.nn.functional.linear(x, w, b)  # [..., rows]

            module.forward = forward
            return module

    return HeadReplicas()


@dataclass(frozen=True)
class RowCopies:
    """The rows of a rank's local shard that are copies of a group other ranks hold too (`grouped_segments`):
    local row indices `rows`, the group `slot` of `slots` this rank holds, the tp group."""

    rows: tuple[int, ...]
    slot: int
    slots: int
    group: object


class _SumCopiedRows(torch.autograd.Function):
    """Identity forward; backward sums the gradient of the copied rows over the ranks holding the same group
    (`_SumOverCopies` on those rows only; every other row's gradient is this rank's own)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, copies: RowCopies) -> torch.Tensor:
        ctx.copies = copies
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        c = ctx.copies
        index = torch.tensor(c.rows, device=grad.device)
        grad = grad.clone()
        grad[index] = _sum_in_slot(grad[index], c.slot, c.slots, c.group)  # [copied rows, ...]
        return grad, None


def sum_over_group(x: torch.Tensor, slot: int, slots: int, group) -> torch.Tensor:
    """The sum of x over the tp ranks holding the same group (slot `slot` of `slots`) as this one, on each of
    them; its backward the same sum of the gradient (each rank's output feeds only its own work). A norm over
    a group of channels split over those ranks (Mamba-2's gated norm at n_groups < t) sums its squares so."""
    return _SumOverGroup.apply(x, slot, slots, group)


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: int, slots: int, group) -> torch.Tensor:
        ctx.slot, ctx.slots, ctx.group = slot, slots, group
        return _sum_in_slot(x, slot, slots, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum_in_slot(grad, ctx.slot, ctx.slots, ctx.group), None, None, None


class GroupSumOnce:
    """`sum_over_group` inside a `recompute` region (runtime.chunk_recompute), which runs its function in the
    forward and again in the backward: the forward's all-reduced sum is kept (for Mamba-2's gated norm a
    [..., 1] tensor of sums of squares, 1/(Di/t) of the region's output) and the backward's rerun returns it
    with the same backward (the gradient summed over the group) instead of all-reducing the same values again,
    so the backward issues one collective, the gradient's. One instance per region call, called once per run
    of the region's function."""

    def __init__(self):
        self.value = None

    def __call__(self, x: torch.Tensor, slot: int, slots: int, group) -> torch.Tensor:
        if self.value is None:  # the forward's run: the all-reduce
            out = sum_over_group(x, slot, slots, group)
            self.value = out.detach()
            return out
        return _ReplayedSum.apply(x, self.value, slot, slots, group)  # the rerun: the kept sum


class _ReplayedSum(torch.autograd.Function):
    """`value` (the forward's sum over the group of x) as the sum of x, with sum_over_group's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor, slot: int, slots: int, group) -> torch.Tensor:
        ctx.slot, ctx.slots, ctx.group = slot, slots, group
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum_in_slot(grad, ctx.slot, ctx.slots, ctx.group), None, None, None, None


def grouped_segments(segments: dict[str, tuple[int, ...]], groups: tuple[int | None, ...], *, linear: bool):
    """A ParallelStyle for a module whose parameters named in `segments` are fused along dim 0 from segments of
    those sizes, some of them (`groups[i]` set) made of fewer groups than the t tp ranks: each rank holds its 1/t
    of the other segments and the one group its heads read of those (segment_order), replicated over the t /
    groups[i] ranks that share it (Mamba-2's B and C projections and conv channels at n_groups < t: Megatron-LM
    and mamba_ssm refuse it). Each parameter becomes the tp-side tensor of that layout split Shard(0), as
    `head_replicas` does; the copied rows' gradients are summed over the ranks sharing them (`tp_local`), so the
    copies stay equal and their gradient is the single-process one. `linear`: the module is an nn.Linear whose
    forward reads replicated x (its gradient summed over the ranks, as a column-parallel input's is)."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class GroupedSegments(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh):
            t = device_mesh.size()
            few = {k for k in groups if k is not None and k < t}
            if len(few) > 1 or any(t % k for k in few):
                raise ValueError(f"tp = {t} must be a multiple of the one group count of {groups} below it")
            module.tp_layouts = dict(getattr(module, "tp_layouts", {}))
            for name, p in list(module.named_parameters(recurse=False)):
                if name not in segments:
                    continue
                sizes = segments[name]
                layout = segments_layout(sizes, t, groups)
                full = (torch.empty((len(layout.rows), *p.shape[1:]), dtype=p.dtype, device=p.device) if p.is_meta
                        else tp_side(p.detach(), layout))  # [t * local rows, ...]
                shard = distribute_tensor(full, device_mesh, [Shard(0)], src_data_rank=None)
                setattr(module, name, nn.Parameter(shard, requires_grad=p.requires_grad))
                module.tp_layouts[name] = layout
            sizes = next(iter(segments.values()))
            local_sizes = [n // k if k is not None and k < t else n // t for n, k in zip(sizes, groups)]
            starts = [sum(local_sizes[:i]) for i in range(len(local_sizes))]
            copied = tuple(i for start, n, k in zip(starts, local_sizes, groups) if k is not None and k < t
                           for i in range(start, start + n))
            k = next(iter(few), 1)
            module.tp_copies = RowCopies(copied, device_mesh.get_local_rank() // (t // k), k,
                                         device_mesh.get_group()) if few else None
            module.tp_mesh = device_mesh
            if linear:
                group = device_mesh.get_group()

                def forward(x: torch.Tensor) -> torch.Tensor:
                    x = copy_to_tp(x, group)  # [..., in]
                    return torch.nn.functional.linear(x, tp_local(module, "weight"), tp_local(module, "bias"))

                module.forward = forward
            return module

    return GroupedSegments()


def tp_local(module, name: str) -> torch.Tensor | None:
    """Parameter `name` of `module` as its forward reads it: `local`, and where `grouped_segments` replicated
    some of its rows over ranks, those rows' gradient summed over the ranks sharing them. None for an absent
    parameter."""
    p = getattr(module, name)
    if p is None:
        return None
    copies = getattr(module, "tp_copies", None)
    return local(p) if copies is None else _SumCopiedRows.apply(local(p), copies)


def shared_weight(module, p: torch.Tensor | None = None) -> torch.Tensor:
    """Parameter `p` of `module` (default its `weight`), replicated on the tp ranks while the work that reads
    it is split (a per-head norm's weight shared by heads on different ranks: Gated DeltaNet's, KDA's,
    attention's qk norms): its gradient, each rank's share, summed over them. As it is when `module` was not
    tp-marked (mark_tp)."""
    p = module.weight if p is None else p
    mesh = getattr(module, "tp_mesh", None)
    return p if mesh is None else copy_to_tp(local(p), mesh.get_group())


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
