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


def tp_plans(ir: ModelIR, tp: int) -> list[dict]:
    """The tensor-parallel plan of each sub-layer's mixer (in stack order); TensorParallelUnsupported
    naming the layer and kind when one has none."""
    plans = []
    for layer in ir.layers:
        kind = runtime_kind(layer.kind)
        if kind.tp_plan is None:
            raise TensorParallelUnsupported(
                f"no tensor-parallel plan for kind {layer.kind!r} (layer '{layer.definition}'); "
                f"run it with tp = 1, or declare tp_plan in runtime/kinds/{layer.kind}.py")
        try:
            plans.append(kind.tp_plan(layer.mixer, tp))
        except TensorParallelUnsupported as e:
            raise TensorParallelUnsupported(f"layer '{layer.definition}': {e}") from None
    return plans


def apply_tensor_parallel(model, tp_mesh) -> None:
    """Split every mixer of `model` (an LTModel, meta or materialised) over the 1-D mesh `tp_mesh`, and record
    the mesh as `model.tp_mesh`: its `new_cache` then allocates one rank's heads (runtime.cache)."""
    from torch.distributed.tensor.parallel import parallelize_module

    plans = tp_plans(model.ir, tp_mesh.size())
    done: set[int] = set()
    for block, plan in zip(model.layers, plans):
        if id(block) in done:  # a tied block is one module: split it once
            continue
        done.add(id(block))
        own = plan.get("")  # the mixer's own parameters (parallelize_module's keys name submodules only)
        if own is not None:
            parallelize_module(block.mixer, tp_mesh, own)
        parallelize_module(block.mixer, tp_mesh, {k: v for k, v in plan.items() if k})
    apply_vocab_parallel(model, tp_mesh)
    model.tp_mesh = tp_mesh


def apply_vocab_parallel(model, tp_mesh) -> None:
    """Embedding and LM head split by vocabulary rows over tp (Megatron's vocab-parallel embedding): the
    embedding as torch's RowwiseParallel (each rank looks up its rows, one all-reduce), the head's weight
    Shard(0) (tied: the embedding's): the training losses read this rank's V/t rows (`vocab_shard`,
    vocab-parallel cross-entropy), LTModel.head (inference) its V/t logits, then gathered."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from ltmdsl.runtime.tensor_parallel import shard_parameters

    if model.ir.vocab % tp_mesh.size():
        raise TensorParallelUnsupported(f"tp = {tp_mesh.size()} must divide the vocabulary of {model.ir.vocab}")
    parallelize_module(model.embed, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
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
