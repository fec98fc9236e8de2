"""Pipeline parallelism with torch.distributed.pipelining: stages cut where the memory model cuts them,
run by the 1F1B schedule over the plan's micro-batches.

Stage i holds the contiguous sub-layers `ltmdsl.memory.assemble.stage_ranges(L, pp)[i]` (the first
L mod pp stages one more), plus the embedding on the first stage and the final norm and head on the last.
Between stages travels one tensor, the residual stream h [b, T, d] with the pending mixer output already
added (the same `pending + h` the next norm would compute), so the stages compute exactly the model's
forward. Parameter names stay the model's (`layers.<i>.…`), so optimizers, gradients and checkpoints
line up with the single-process model. A stage is materialised alone: the other stages' parameters
stay on the meta device while the seeded init runs over the whole model, so weights equal one process.

Refused: tied embeddings and tie groups spanning stages (one parameter on two ranks).
"""

from __future__ import annotations

import torch
from torch import nn

from ltmdsl.memory.assemble import stage_ranges


class PipelineUnsupported(ValueError):
    """A model the pipeline cannot cut under this plan (the message says why)."""


class Stage(nn.Module):
    """Sub-layers `layers` of `model` (first stage: from token ids; last: to logits)."""

    def __init__(self, model, layers: range, first: bool, last: bool):
        super().__init__()
        self.ir = model.ir
        self.first, self.last = first, last
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.final_norm = model.final_norm if last else None
        self.lm_head = model.lm_head if last else None
        self._head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ids [b, T] (first stage) or h [b, T, d] -> h [b, T, d], or logits [b, T, V] on the last stage."""
        h = self.embed(x) if self.first else x  # [b, T, d]
        pending = None
        for block in self.layers.values():
            h, pending = block.advance(h, pending, None, 0, False, self.ir.residual_scale)  # [b, T, d] each
        if self.last:
            normed, _ = self.final_norm(h, None) if pending is None else self.final_norm(pending, h)
            return self._head(normed)  # [b, T, V]
        return h if pending is None else pending + h  # the residual add the next stage's norm would do


def check_pipeline(ir, pp: int) -> list[range]:
    """The stage ranges; PipelineUnsupported for tied embeddings or a tie group across stages."""
    if ir.tie_embeddings and pp > 1:
        raise PipelineUnsupported("pp > 1 with tied embeddings (the head is the first stage's embedding) is not "
                                  "supported yet")
    ranges = stage_ranges(len(ir.layers), pp)
    stage_of = {i: s for s, r in enumerate(ranges) for i in r}
    groups: dict = {}
    for layer in ir.layers:
        if layer.tie_group is not None:
            groups.setdefault((layer.tie_group, layer.tie_slot), set()).add(stage_of[layer.index])
    spread = [g for g, stages in groups.items() if len(stages) > 1]
    if spread:
        raise PipelineUnsupported(f"tie group '{spread[0][0]}' spans pipeline stages (one weight on two ranks)")
    return ranges


def build_stage(model, pp_mesh, microbatches: int):
    """(Stage module of this pp rank, its 1F1B schedule). `model` is the meta LTModel."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    ranges = check_pipeline(model.ir, pp_mesh.size())
    i = pp_mesh.get_local_rank()
    stage = Stage(model, ranges[i], first=i == 0, last=i == len(ranges) - 1)
    return stage, lambda device: Schedule1F1B(
        PipelineStage(stage, i, len(ranges), device, group=pp_mesh.get_group()), microbatches,
        loss_fn=_loss, scale_grads=True)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A micro-batch's mean cross-entropy (fp32 softmax), as LTModel.loss; the schedule averages them."""
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def pipeline_loss(schedule, stage: Stage, pp_mesh, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Run forward and backward of one batch through the pipeline; the mean loss (a 0-d tensor) on
    every pp rank (broadcast from the last stage)."""
    import torch.distributed as dist

    losses: list = []
    if stage.first and stage.last:
        raise PipelineUnsupported("one stage is not a pipeline")
    if stage.first:
        schedule.step(input_ids)
    elif stage.last:
        schedule.step(target=targets, losses=losses)
    else:
        schedule.step()
    loss = torch.stack(losses).mean().detach() if stage.last else torch.zeros((), dtype=torch.float32)
    last = dist.get_global_rank(pp_mesh.get_group(), pp_mesh.size() - 1)
    dist.broadcast(loss, src=last, group=pp_mesh.get_group())
    return loss
