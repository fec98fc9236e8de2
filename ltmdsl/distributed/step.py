"""One training step of a rank, the batch split it needs, and full tensors gathered back from shards.

    ids, tgt = shard_batch(ids, ranked), shard_batch(tgt, ranked)   # this rank's rows (dp) and tokens (cp)
    loss = train_step(ranked, optimizer, ids, tgt)                                  # the global mean loss

The loss of a step is the mean next-token cross-entropy over the global batch: each dp rank takes B/dp
sequences, each cp rank T/cp of their tokens, and the mean of the ranks' means (equal token counts) is
returned on every rank. It is the model's head and cross-entropy together, chunked (ltmdsl.train.loss),
vocab-parallel under tp: no rank holds [B, T, V] logits. Gradients are averaged over the dp x cp ranks by FSDP2's reduce-scatter (ZeRO
2/3) or `sync_gradients` (ZeRO 0/1), so they equal the single-process gradients of the global batch.
"""

from __future__ import annotations

import torch

from ltmdsl.distributed.context_parallel import shard_sequence
from ltmdsl.distributed.data_parallel import FSDP_STAGES, sync_gradients
from ltmdsl.distributed.pipeline import pipeline_loss
from ltmdsl.runtime.tensor_parallel import RowLayout, stored_layout
from ltmdsl.train.loss import summed_target_loss


def shard_batch(batch: torch.Tensor, ranked) -> torch.Tensor:
    """This rank's part of batch [B, T, ...]: its dp rank's B/dp rows and its cp rank's T/cp tokens (its two
    chunks under the balanced split; tensor-parallel peers get the same)."""
    n, r = ranked.dp_mesh.size(), ranked.dp_mesh.get_local_rank()
    if batch.shape[0] % n:
        raise ValueError(f"dp = {n} does not divide the batch of {batch.shape[0]} sequences")
    rows = batch.shape[0] // n
    batch = batch[r * rows:(r + 1) * rows]
    if ranked.plan.cp > 1:
        batch = shard_sequence(batch, ranked.cp_mesh.get_local_rank(), ranked.plan.cp, ranked.plan.cp_split)
    return batch


def forward_backward(ranked, input_ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Loss and averaged gradients (accumulated into .grad) of this rank's part [B/dp, T/cp]; returns the
    global batch's mean loss (identical on every rank)."""
    import torch.distributed as dist

    if ranked.plan.pp > 1:  # the schedule runs forward and backward of every micro-batch
        loss = pipeline_loss(ranked.schedule, ranked.model, ranked.pp_mesh, input_ids, targets)
    else:
        hidden = ranked.model(input_ids, output="hidden")  # [B/dp, T/cp, d]
        summed, _, count = summed_target_loss(ranked.model, hidden, targets)  # chunked; vocab-parallel under tp
        loss = summed / count  # this rank's mean over its B/dp rows, T/cp tokens
        loss.backward()
    replicas = ranked.replica_mesh
    if ranked.plan.zero not in FSDP_STAGES:
        sync_gradients(ranked.model, replicas, ranked.dp_sharded, ranked.expert_replicas)
    total = loss.detach().clone()
    dist.all_reduce(total, group=replicas.get_group())
    return total.item() / replicas.size()


def train_step(ranked, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor, targets: torch.Tensor) -> float:
    """zero_grad, forward_backward, optimizer step; returns the global batch's mean loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(ranked, input_ids, targets)
    optimizer.step()
    return loss


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or gradient, on every rank (collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def row_layouts(model) -> dict[str, "RowLayout"]:
    """name -> RowLayout of every parameter whose tp-side rows tensor parallelism laid out apart from its
    stored rows (fused tensors split by segments, replicated KV heads: runtime.tensor_parallel); its
    gathered tensor is in that order."""
    return {f"{m}.{n}" if m else n: layout for m, mod in model.named_modules()
            for n, layout in getattr(mod, "tp_layouts", {}).items()}


def _full(name: str, t: torch.Tensor, layouts: dict) -> torch.Tensor:
    full = full_tensor(t).detach().cpu()
    return stored_layout(full, layouts[name]) if name in layouts else full


def full_gradients(model) -> dict[str, torch.Tensor]:
    """name -> the full gradient of every parameter, in its stored layout (a collective: every rank must
    call it)."""
    layouts = row_layouts(model)
    return {n: _full(n, p.grad, layouts) for n, p in model.named_parameters() if p.grad is not None}


def full_parameters(model) -> dict[str, torch.Tensor]:
    """name -> the full value of every parameter, in its stored layout (a collective: every rank must
    call it)."""
    layouts = row_layouts(model)
    return {n: _full(n, p, layouts) for n, p in model.named_parameters()}
