"""Sequence parallelism (Megatron-LM's, Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"): under tensor parallelism, the residual stream and the norms of each tp rank hold T/t of
its tokens instead of all of them.

    embedding     vocab-parallel lookup, reduce-scattered over the sequence (RowwiseParallel with
                  output_layouts=Shard(1)): [B, L] ids -> [B, L/t, d]
    norm          token-local, so it runs on the rank's L/t tokens unchanged; its weight is the same on every
                  tp rank and each rank's tokens give only part of its gradient, so the gradient is summed over
                  the tp ranks (`sequence_parallel_norm`: torch's SequenceParallel semantics, Shard(1) in and out,
                  the replicated weight's Partial gradient reduced, for the runtime's fused add + norm, which
                  takes two tensors and returns two, and its kernels, which run on local tensors)
    mixer         needs every token (attention's keys, a recurrence's scan): its input is all-gathered over the
                  sequence on entry (Megatron gathers at the mixer's input projection); its output leaves
                  sequence-sharded, reduce-scattered by the row-parallel output projection itself
                  (RowwiseParallel(output_layouts=Shard(1))) where every output projection of the kind is one,
                  else the kind's own all-reduced output cut to the rank's tokens (MoE, whose expert sums are
                  reduced by the kind, and under the balanced cp split, whose folded pieces the projection sees)
    final norm    its output all-gathered over the sequence: the vocab-parallel loss (each rank's V/t logits
                  of every token) needs every token's hidden state, as Megatron gathers before its output layer

Inside pipeline stages the stream crosses a stage boundary sequence-sharded, [B, L/t, d] (pipeline.py): the
first stage's embedding scatters it, the last stage's final norm gathers it.

L is the rank's tokens (T/cp under context parallelism: the sequence dimension sp splits is the one cp left,
in the rank's own token order, both chunks of the balanced split together), and t must divide it.

Every collective is a DTensor redistribution, so its backward is DTensor's: the gather's gradient is cut to
the rank's tokens (the kinds already sum their input gradient over the tp ranks, as plain tp needs), a
reduce-scatter's or a cut's gradient all-gathered. Exact against one process (tests/distributed/
test_sequence_parallel.py). What a rank keeps for backward: its L/t tokens of the stream and the norms, and
each mixer's gathered input whole (its projections save it; Megatron-LM keeps the local part and gathers it
again in backward), as the memory model's eager convention counts (ltmdsl/memory/activations.py).
"""

from __future__ import annotations

import torch

from ltmdsl.runtime.kinds import runtime_kind


def gather_sequence(x: torch.Tensor, mesh) -> torch.Tensor:
    """This rank's tokens x [B, L/t, ...] -> every tp rank's, in order, [B, L, ...] (all-gather; backward: this
    rank's slice of the gradient, which the consumers have already made whole on every rank)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def scatter_sequence(y: torch.Tensor, mesh) -> torch.Tensor:
    """A tensor whole on every tp rank, y [B, L, ...] -> this rank's tokens [B, L/t, ...] (a copy, so the
    whole tensor is freed; backward: the ranks' gradients all-gathered)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if y.shape[1] % mesh.size():
        raise ValueError(f"sequence parallelism: tp = {mesh.size()} does not divide the {y.shape[1]} tokens of "
                         "this rank")
    part = DTensor.from_local(y, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()
    return part.contiguous()


def sequence_parallel_norm():
    """A torch ParallelStyle for the runtime's Norm on sequence-sharded tokens: records the tp group as
    `module.sequence_parallel`, through which Norm.forward reads its weight and bias (identity forward, the
    gradient summed over the tp ranks in backward: runtime.tensor_parallel.copy_to_tp)."""
    from torch.distributed.tensor.parallel import ParallelStyle

    class SequenceParallelNorm(ParallelStyle):
        def _apply(self, module, device_mesh):
            module.sequence_parallel = device_mesh.get_group()
            return module

    return SequenceParallelNorm()


def sequence_region(output_sharded: bool):
    """A torch ParallelStyle for a mixer under sequence parallelism: its first input all-gathered over the
    sequence before it runs; its output cut to this rank's tokens unless `output_sharded` (the row-parallel
    output projections already reduce-scatter it)."""
    from torch.distributed.tensor.parallel import ParallelStyle

    class SequenceRegion(ParallelStyle):
        def _apply(self, module, device_mesh):
            def enter(_module, args):
                return (gather_sequence(args[0], device_mesh),) + tuple(args[1:])  # [B, L, d]

            def leave(_module, _args, out):
                return out if output_sharded else scatter_sequence(out, device_mesh)  # [B, L/t, d]

            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)
            return module

    return SequenceRegion()


def sequence_sharded_outputs(layer, plan: dict) -> dict | None:
    """`plan` (a layer's tp plan) with each output projection's RowwiseParallel reduce-scattering over the
    sequence (output_layouts=Shard(1)), or None when an output projection of the kind (its `outputs`) is not
    a plain RowwiseParallel there (the kind reduces it itself)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import RowwiseParallel

    modules = {name.rsplit(".", 1)[0] for name in runtime_kind(layer.kind).outputs(layer.mixer)}
    if not modules or any(type(plan.get(m)) is not RowwiseParallel for m in modules):
        return None
    out = dict(plan)
    for m in modules:
        style = plan[m]
        out[m] = RowwiseParallel(input_layouts=style.input_layouts[0], output_layouts=Shard(1),
                                 use_local_output=style.use_local_output)
    return out


def apply_sequence_parallel(model, tp_mesh, mixer_outputs: list[bool]) -> None:
    """Make `model`'s stream sequence-sharded over the 1-D `tp_mesh` (module docstring). `mixer_outputs[i]`:
    whether layer i's output projections reduce-scatter already (`sequence_sharded_outputs`). The embedding
    is set up by tensor_parallel.apply_vocab_parallel."""
    from torch.distributed.tensor.parallel import parallelize_module

    done: set[int] = set()
    for block, sharded in zip(model.layers, mixer_outputs):
        if id(block) in done:  # a tied block is one module: hooked once
            continue
        done.add(id(block))
        parallelize_module(block.norm, tp_mesh, sequence_parallel_norm())
        if block.post_norm is not None:
            parallelize_module(block.post_norm, tp_mesh, sequence_parallel_norm())
        parallelize_module(block.mixer, tp_mesh, sequence_region(sharded))
    parallelize_module(model.final_norm, tp_mesh, sequence_parallel_norm())
    model.final_norm.register_forward_hook(
        lambda _m, _args, out: (gather_sequence(out[0], tp_mesh),) + tuple(out[1:]))  # normed [B, L, d]
