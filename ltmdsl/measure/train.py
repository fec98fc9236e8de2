"""The traced training step of one rank: forward, backward and optimizer step on fake tensors.

    setup      the stage's weights (traced as they are given storage), the main gradients, the optimizer states
    forward    the in-flight micro-batches (1F1B: min(pp - stage, m) on this stage), each [b, s] tokens,
               b = ceil(B/(dp*m)), s = T; the stack under the budget's recompute policy
    loss       (last stage) head and cross-entropy, chunked when the budget says so
    backward   every in-flight micro-batch, gradients added into the main-gradient buffer
    optimizer  one AdamW step on the local shard

Recompute, as the memory model defines it (ltmdsl/memory/activations.py):
    none       plain autograd
    selective  without flash attention the attention core runs under torch.utils.checkpoint (its s*T scores
               are recomputed); with flash there is nothing to drop. The recurrent kinds' scans recompute
               their internals under every policy (their ops do), so they trace as they run
    full       each unit (a mixer and the FFN after it) runs under torch.utils.checkpoint, which keeps only
               the unit's input; the working set (one unit's activations, live again while it back-propagates)
               is traced by running each distinct unit once without the checkpoint, after the optimizer step
               (a probe's graph through a custom Function is not freed with its output; traced before the step,
               as until then, it stayed live through it and added a unit's activations to the traced peak)
Chunked loss: each chunk of C tokens computes its logits and loss under a checkpoint, so only one chunk's
logits exist at a time (in the backward); the traced logits are then one chunk's loss run without checkpoint.
Under tensor parallelism the loss is the one training runs there (`ltmdsl train`, the pipeline's last stage):
the vocab-parallel cross-entropy of ltmdsl.train.loss on this rank's V/t head rows, b*C rows at a time with a
chunked loss (whole otherwise); it forms its gradients in the forward and keeps those, no logits, so it needs
no checkpoint and the traced "logits" are what it keeps. Until then the trace gathered the V/t logits into
whole V through LTModel.head (inference's path), which no training rank runs.

Traced components are differences of live bytes (`Timeline`): weights at setup, gradients and optimizer as
their buffers are allocated, activations over the stack's forward, logits over the loss's forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ltmdsl.measure import states as st
from ltmdsl.measure.stage import Stage
from ltmdsl.measure.timeline import Timeline
from ltmdsl.memory.settings import Settings
from ltmdsl.memory.training import in_flight
from ltmdsl.runtime.build import TORCH_DTYPES


#: what a loss call keeps besides its logits: its fp32 value and nll_loss's fp32 total weight
LOSS_SCALARS = 8
#: what the vocab-parallel loss keeps besides its two gradients: its fp32 mean (its sum and count of correct
#: predictions are not held by the graph)
VOCAB_PARALLEL_SCALARS = 4


def _run_unit(stage: Stage, unit: list[int], h: torch.Tensor) -> torch.Tensor:
    """One checkpoint unit from a materialised residual h [b, s, d] to the next one [b, s, d]."""
    pending = None
    for i in unit:
        h, pending = stage.net.layers[i].advance(h, pending, None, 0, False, stage.net.ir.residual_scale)
    return h + pending


def stack_forward(stage: Stage, x: torch.Tensor, recompute: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: token ids [b, s] (first stage) or the received hidden states [b, s, d] -> (h, pending), the residual
    and the last mixer's output not yet added (LTModel.forward's fused residual, unit by unit under full)."""
    net = stage.net
    h = net.embed(x) if stage.first else x  # [b, s, d]
    embeds = h if getattr(net, "embeds_needed", False) else None  # [b, s, d], for input = concat_embed
    pending = inject = None
    for unit in stage.units:
        if recompute == "full":
            if pending is not None:
                h, pending = h + pending, None
            h = checkpoint(_run_unit, stage, unit, h, use_reentrant=False)  # [b, s, d]
            continue
        for i in unit:
            block = net.layers[i]
            if block.wide or inject is not None:  # embeddings, an injected branch or per-use parameters
                use = net.uses[str(i)] if str(i) in net.uses else None
                h, pending, inject = block.flow(h, pending, inject, None, 0, False, net.ir.residual_scale, embeds, use)
            else:
                h, pending = block.advance(h, pending, None, 0, False, net.ir.residual_scale)  # [b, s, d] each
    return h, pending


def _final_norm(stage: Stage, h: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    """The final norm of the residual h plus the last mixer's pending output -> normed [b, s, d]."""
    normed, _ = stage.net.final_norm(h, None) if pending is None else stage.net.final_norm(pending, h)
    return normed


def _gather_root(stage: Stage) -> None:
    """ZeRO-3: gather FSDP2's root parameters (everything outside the mixers) before the step, as its forward
    does first; they stay gathered through the backward (not resharded after the forward), so they are weights
    of the step, not activations. Nothing without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(stage.root, FSDPModule):
        stage.root.unshard()


def _as_root(stage: Stage, body, x: torch.Tensor) -> torch.Tensor:
    """body(x), run as the model's forward when the model is FSDP2's root (ZeRO-3): its hooks gather the root's
    the backward, as `LTModel.loss` calling the model does. Otherwise body(x) as it is."""
    from torch.distributed.fsdp import FSDPModule

    net = stage.root  # the model, or under pp the pipeline stage FSDP2 shards
    if not isinstance(net, FSDPModule):
        return body(x)
    net.forward = body  # an instance attribute: nn.Module.__call__ runs it between the FSDP hooks
    try:
        return net(x)
    finally:
        del net.forward


def _chunk_loss(net, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: normed [b, c, d], targets [b, c] -> [] (fp32 logits, as LTModel.loss)."""
    logits = net.head(normed)  # [b, c, V]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def vocab_parallel(net) -> bool:
    """Whether the head is split by vocabulary over tp ranks (a DTensor weight), so training's loss is the
    vocab-parallel one (ltmdsl.train.loss.summed_target_loss)."""
    return hasattr(net.head_weight(), "device_mesh")


def _vocab_parallel_loss(net, normed: torch.Tensor, targets: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Summed vocab-parallel cross-entropy on this rank's V/t head rows: normed [b, s, d], targets [b, s] -> [],
    as summed_target_loss computes it (every position a target: no data-dependent selection on fake tensors)."""
    from ltmdsl.distributed.tensor_parallel import vocab_shard
    from ltmdsl.train.loss import summed_cross_entropy

    rows = normed.flatten(0, 1)  # [b*s, d]
    if net.ir.logit_scale != 1.0:
        rows = rows * net.ir.logit_scale  # [b*s, d]
    weight, shard = vocab_shard(net.head_weight())  # [V/t, d]
    width = rows.shape[0] if chunk is None else normed.shape[0] * min(chunk, normed.shape[1])  # b*C rows
    total, _ = summed_cross_entropy(rows, weight, targets.flatten(), width, net.ir.logit_cap, shard)
    return total


def loss_forward(net, normed: torch.Tensor, targets: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Mean next-token loss; with `chunk`, chunk by chunk under checkpoints (module docstring); vocab-parallel
    under tp, chunk by chunk inside the loss."""
    n = targets.numel()
    if vocab_parallel(net):
        return _vocab_parallel_loss(net, normed, targets, chunk) / n
    if chunk is None or chunk >= normed.shape[1]:
        return _chunk_loss(net, normed, targets) / n
    total = None
    for c0 in range(0, normed.shape[1], chunk):
        part = checkpoint(_chunk_loss, net, normed[:, c0:c0 + chunk], targets[:, c0:c0 + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total / n


def run(stage: Stage, ir, s: Settings, tl: Timeline, dtype: torch.dtype) -> dict:
    """The traced step (module docstring); returns the traced components, in bytes, and notes."""
    p = s.parallel
    b = math.ceil(s.batch / (p.dp * p.microbatches))
    seq = s.context // p.cp  # a context-parallel rank's tokens (the memory model's T/c)
    # under sequence parallelism the residual stream (between the units, across a stage boundary) holds a tp
    # rank's T/(c*t) tokens
    stream = seq // p.tp if p.sequence_parallel and p.tp > 1 else seq
    flight = int(in_flight(stage.index, s))
    out: dict[str, int] = {}
    _gather_root(stage)
    base = tl.mark("start")
    params = stage.params()
    out["weights"] = base - stage.buffer_bytes()  # the held parameters (and buffers) are all that is live
    experts = stage.expert_params()
    for prm in params:
        prm.requires_grad_(True)
    grad_dtype = TORCH_DTYPES[s.grad_dtype.name]
    groups = st.allocate([q for q in params if id(q) not in experts], [q for q in params if id(q) in experts], s,
                         grad_dtype, stage.numel)
    after_grads = sum(g.grads.numel() * g.grads.element_size() for g in groups)
    live = tl.mark("gradients")
    out["gradients"] = after_grads
    out["optimizer"] = live - base - after_grads
    handles = st.install_grad_hooks(groups)
    chunk = s.chunk if s.chunked_loss else None
    split_head = stage.last and vocab_parallel(stage.net)
    pending_backward = []
    act, logits = 0, 0
    for k in range(flight):
        before = tl.mark(f"micro-batch {k}: inputs")
        if stage.first:
            x = torch.zeros(b, seq, dtype=torch.long)  # [b, s] token ids
        else:
            # [b, s, d] received; under sequence parallelism the previous stage sends its tp rank's s/t tokens
            x = torch.zeros(b, stream, ir.d_model, dtype=dtype, requires_grad=True)
        start = tl.mark(f"micro-batch {k}: inputs ready")
        if stage.last:
            normed = _as_root(stage, lambda ids: _final_norm(stage, *stack_forward(stage, ids, s.recompute)), x)
            stacked = tl.mark(f"micro-batch {k}: forward")
            targets = torch.zeros(b, seq, dtype=torch.long)  # [b, s]
            t0 = tl.mark(f"micro-batch {k}: targets")
            loss = loss_forward(stage.net, normed, targets, chunk)
            scalars = VOCAB_PARALLEL_SCALARS if split_head else (0 if chunk else LOSS_SCALARS)
            logits = max(logits, tl.mark(f"micro-batch {k}: loss") - t0 - scalars)
            pending_backward.append((loss, None))
        else:
            h, pending = stack_forward(stage, x, s.recompute)
            y = h if pending is None else h + pending  # [b, s, d] sent to the next stage
            del h, pending
            stacked = tl.mark(f"micro-batch {k}: forward")
            pending_backward.append((y, torch.zeros_like(y)))
        act += stacked - start
        del x
        tl.mark(f"micro-batch {k}: inputs released")
        _ = before
    if stage.last and chunk is not None and not split_head:  # one chunk's logits, as its backward recomputes them
        t0 = tl.mark("loss chunk: start")
        probe = _chunk_loss(stage.net, normed[:, :chunk].detach(), targets[:, :chunk])
        logits = tl.mark("loss chunk: forward") - t0 - LOSS_SCALARS
        del probe
    out["logits"] = logits if stage.last else 0
    for k, (y, grad) in enumerate(pending_backward):
        torch.autograd.backward(y, grad)
        tl.mark(f"micro-batch {k}: backward")
    del pending_backward, y, grad
    if stage.last:
        del normed, loss, targets
    tl.mark("backward done")
    st.adamw_step(groups)
    tl.mark("optimizer step")
    # full recompute: the working set, traced after the step: a graph through a custom Function (the recurrent
    # kinds' recompute) is not freed with the probe's output, so traced first it stayed live through the step
    working = _working_set(stage, b, stream, dtype, tl) if s.recompute == "full" else 0
    out["activations"] = act + working
    for hd in handles:
        hd.remove()
    return out


def rank_storage(t: torch.Tensor):
    """The storage a tensor occupies on this rank: a DTensor's local shard's (the DTensor wrapper's own storage
    has its global shape's size, which no rank allocates), a plain tensor's own."""
    from torch.distributed.tensor import DTensor

    return (t._local_tensor if isinstance(t, DTensor) else t).untyped_storage()


def saved_bytes(fn, *args, exclude=()) -> tuple[int, object]:
    """Run fn(*args) and count what autograd keeps for its backward: the unique storages packed by saved-tensor
    hooks, leaving out `exclude` (the parameters), each DTensor counted as its rank's local shard (its wrapper
    reports the global shape's bytes: a tensor-parallel rank's working set was counted up to t times over, +73%
    on a tp 8 x cp 8 rank of ltm-100m). Returns (bytes, fn's output); everything fn kept is freed with that
    output. Storages are followed by weak reference: one saved by a graph that fn frees before it returns (a
    recurrent kind's chunk recomputed inside its op) is not counted, and counting keeps nothing alive."""
    from torch.multiprocessing.reductions import StorageWeakRef

    skip = {StorageWeakRef(rank_storage(t)).cdata for t in exclude}
    kept: dict[int, tuple[StorageWeakRef, int]] = {}  # storage address -> (weak reference, bytes)

    def pack(t):
        ref = StorageWeakRef(rank_storage(t))
        if ref.cdata not in skip and (ref.cdata not in kept or kept[ref.cdata][0].expired()):
            kept[ref.cdata] = (ref, rank_storage(t).nbytes())
        return t.detach()  # not t: a saved output packed as itself is a reference cycle through its grad_fn

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(n for ref, n in kept.values() if not ref.expired()), out


def _working_set(stage: Stage, b: int, seq: int, dtype: torch.dtype, tl: Timeline) -> int:
    """Full recompute: the largest unit's activations (what is live again while it back-propagates), traced by
    running each distinct unit once without its checkpoint and counting what autograd keeps (saved-tensor
    hooks). `seq`: the tokens of the stream entering a unit (a tp rank's share under sequence parallelism)."""
    d = stage.net.ir.d_model
    params = stage.params()
    best, seen = 0, set()
    for unit in stage.units:
        sig = tuple((stage.net.ir.layers[i].mixer, stage.net.ir.layers[i].norm) for i in unit)
        if sig in seen:
            continue
        seen.add(sig)
        h = torch.zeros(b, seq, d, dtype=dtype, requires_grad=True)  # [b, s, d]
        kept, y = saved_bytes(_run_unit, stage, unit, h, exclude=params)
        best = max(best, kept)
        del y, h
    tl.mark("working set")
    return best
