"""Tensor parallelism with DTensor's `parallelize_module`: each mixer split as its kind's `tp_plan` says.

Every sub-layer's mixer is split by the plan its runtime kind declares (runtime/kinds/<kind>.py,
`RuntimeKind.tp_plan`): attention heads and MLP widths column-wise in, row-wise out (Megatron-LM's split,
one all-reduce per mixer in forward and one in backward). A kind without a plan, or a config its plan
cannot split, is refused before any weight exists, naming the kind. The embedding and the LM head are split
by vocabulary rows (`apply_vocab_parallel`); the norms stay replicated (they see the full, all-reduced
activations, so their gradients agree on every rank without communication).
"""

from __future__ import annotations

from ltmdsl.ir import ModelIR
from ltmdsl.runtime.kinds import TensorParallelUnsupported, runtime_kind


def tp_plans(ir: ModelIR, tp: int, expert_tp: int | None = None) -> list[dict]:
    """The tensor-parallel plan of each sub-layer's mixer (in stack order); TensorParallelUnsupported
    naming the layer and kind when one has none. `expert_tp` (the plan's etp; None: tp) reaches the kinds with
    experts (`RuntimeKind.ep_forward`): below tp their routed experts are left to expert parallelism
    (expert_parallel.py), so tp need not divide the experts' width."""
    plans = []
    for layer in ir.layers:
        kind = runtime_kind(layer.kind)
        if kind.tp_plan is None:
            raise TensorParallelUnsupported(
                f"no tensor-parallel plan for kind {layer.kind!r} (layer '{layer.definition}'); "
                f"run it with tp = 1, or declare tp_plan in runtime/kinds/{layer.kind}.py")
        try:
            experts = {"expert_tp": expert_tp} if kind.ep_forward is not None and expert_tp is not None else {}
            plans.append(kind.tp_plan(layer.mixer, tp, **experts))
            if kind.use_tp_plan is not None:
                kind.use_tp_plan(layer.mixer, tp)  # refuse a use it cannot split here too
        except TensorParallelUnsupported as e:
            raise TensorParallelUnsupported(f"layer '{layer.definition}': {e}") from None
    return plans


def apply_use_parallel(model, tp_mesh) -> None:
    """Split each use's own parameters (a shared block's per-use adapters and out_proj, `model.uses`) as its
    kind's `use_tp_plan` says."""
    from torch.distributed.tensor.parallel import parallelize_module

    for index, use in getattr(model, "uses", {}).items():
        layer = model.ir.layers[int(index)]
        parallelize_module(use, tp_mesh, runtime_kind(layer.kind).use_tp_plan(layer.mixer, tp_mesh.size()))


def apply_tensor_parallel(model, tp_mesh, *, sequence_parallel: bool = False, folded_pieces: bool = False,
                          expert_tp: int | None = None) -> None:
    """Split every mixer of `model` (an LTModel, meta or materialised) over the 1-D mesh `tp_mesh`; with
    `sequence_parallel`, the stream between the mixers sequence-sharded too (sequence_parallel.py).
    `folded_pieces`: the mixers see a rank's context-parallel pieces folded into the batch (the balanced cp
    split), so their output projections cannot reduce-scatter the rank's token order themselves. `expert_tp`:
    the plan's etp (`tp_plans`)."""
    from torch.distributed.tensor.parallel import parallelize_module

    from ltmdsl.distributed.sequence_parallel import apply_sequence_parallel, sequence_sharded_outputs

    plans = tp_plans(model.ir, tp_mesh.size(), expert_tp)
    sharded_outputs = []
    for layer, plan in zip(model.ir.layers, plans):
        sharded = sequence_sharded_outputs(layer, plan) if sequence_parallel and not folded_pieces else None
        sharded_outputs.append(sharded is not None)
        if sharded is not None:
            plan.clear()
            plan.update(sharded)
    done: set[int] = set()
    for block, plan in zip(model.layers, plans):
        if id(block) in done:  # a tied block is one module: split it once
            continue
        done.add(id(block))
        own = plan.get("")  # the mixer's own parameters (parallelize_module's keys name submodules only)
        if own is not None:
            parallelize_module(block.mixer, tp_mesh, own)
        parallelize_module(block.mixer, tp_mesh, {k: v for k, v in plan.items() if k})
    apply_use_parallel(model, tp_mesh)
    apply_vocab_parallel(model, tp_mesh, sequence_parallel=sequence_parallel)
    if sequence_parallel:
        apply_sequence_parallel(model, tp_mesh, sharded_outputs)
    model.tp_mesh = tp_mesh  # its new_cache then allocates one rank's heads (runtime.cache)


def apply_vocab_parallel(model, tp_mesh, *, sequence_parallel: bool = False) -> None:
    """Embedding and LM head split by vocabulary rows over tp (Megatron's vocab-parallel embedding): the
    embedding as torch's RowwiseParallel (each rank looks up its rows, one all-reduce; under sequence
    parallelism one reduce-scatter, each rank keeping its L/t tokens), the head's weight
    Shard(0) (tied: the embedding's): the training losses read this rank's V/t rows (`vocab_shard`,
    vocab-parallel cross-entropy), LTModel.head (inference) its V/t logits, then gathered."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from ltmdsl.runtime.tensor_parallel import shard_parameters

    if model.ir.vocab % tp_mesh.size():
        raise TensorParallelUnsupported(f"tp = {tp_mesh.size()} must divide the vocabulary of {model.ir.vocab}")
    rows = Shard(1) if sequence_parallel else Replicate()  # [B, L/t, d] or [B, L, d] on each rank
    parallelize_module(model.embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=rows))
    if model.lm_head is not None:
        parallelize_module(model.lm_head, tp_mesh, shard_parameters(0))


def keep_gradient_placements(model) -> None:
    """Make every DTensor parameter's gradient arrive in the parameter's own placements. DTensor's embedding
    backward returns the vocab-parallel embedding's gradient Replicate (the full V x d on every rank); cut
    to this rank's rows (no communication) it is what the memory model counts. Call on the materialised
    model (hooks live on the parameter objects); FSDP2 reduce-scatters gradients itself."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            p.register_hook(lambda g, p=p: g if g.placements == p.placements
                            else g.redistribute(p.device_mesh, p.placements))
def vocab_shard(weight):
    """(this rank's rows [V/t, d] of a head weight, its VocabShard) under vocab-parallel tp (`weight` a DTensor
    Shard(0) over the 1-D tp mesh, as apply_vocab_parallel leaves it and FSDP2 unshards it); (weight, None)
    for a plain tensor. The local rows stay differentiable, so their gradient lands in this rank's shard."""
    from ltmdsl.train.loss import VocabShard

    if not hasattr(weight, "device_mesh"):
        return weight, None
    mesh = weight.device_mesh
    if mesh.ndim != 1 or not weight.placements[0].is_shard(0):
        raise TensorParallelUnsupported(f"the head weight is laid out as {weight.placements} over a {mesh.ndim}-D "
                                        "mesh; the vocab-parallel loss needs Shard(0) over the tp ranks")
    rows = weight.to_local()  # [V/t, d]
    start = mesh.get_local_rank() * rows.shape[0]  # torch's Shard(0) of an evenly divided V: contiguous blocks
    return rows, VocabShard(group=mesh.get_group(), start=start, vocab=weight.shape[0])
