"""Pipeline parallelism with torch.distributed.pipelining: stages cut where the memory model cuts them,
run by the 1F1B schedule over the plan's micro-batches.

Stage i holds the contiguous sub-layers `ltmdsl.memory.assemble.stage_ranges(L, pp)[i]` (the first
L mod pp stages one more), plus the embedding on the first stage and the final norm and head on the last.
Between stages travels one tensor, the residual stream h [b, T, d] with the pending mixer output already
added (the same `pending + h` the next norm would compute), so the stages compute exactly the model's
forward. Parameter names stay the model's (`layers.<i>.…`), so optimizers, gradients and checkpoints
line up with the single-process model. A stage is materialised alone: the other stages' parameters
stay on the meta device while the seeded init runs over the whole model, so weights equal one process.

With `interleave` = v > 1 the stack is cut into pp * v virtual stages, stage s on rank s mod pp (Megatron's
interleaved schedule), run by torch's ScheduleInterleaved1F1B; a rank's stages are one module for the
optimizer and checkpoints (`RankStages`).

Each stage's ranks may split it further by tp and cp (the split happens on the meta model before the cut)
and shard it by ZeRO 2 / 3 (FSDP2 on the stage's modules, rank_model.parallelize).

Under sequence parallelism (tp with sp) the stream a stage sends is its tp rank's T/t tokens [b, T/t, d], as
it leaves the stage's last sub-layer, and the next stage's rank with the same tp coordinate receives exactly
the tokens its norms take: Megatron-LM sends the sequence-sharded tensor. Gathering first would send t
times the bytes over the stage boundary and keep t times the activation each in-flight micro-batch holds
until its gradient returns (what the memory model counts, `rep` of the stage output), only to cut it again
on the other side. The embedding's reduce-scatter and the final norm's all-gather stay where they are (first
and last stage), so nothing else changes.

Refused: tied embeddings and tie groups spanning ranks (one parameter on two ranks).
"""

from __future__ import annotations

import torch
from torch import nn

from ltmdsl.memory.assemble import stage_ranges


class PipelineUnsupported(ValueError):
    """A model the pipeline cannot cut under this plan (the message says why)."""


#: Target of a position that predicts nothing (cross_entropy's ignore_index).
IGNORE_INDEX = -100


class ScheduleLoss:
    """The loss the 1F1B schedule applies to a micro-batch's last hidden states [b, T, d] (normalised) and
    targets [b, T]: the model's head and cross-entropy together, chunked (ltmdsl.train.loss), so the last
    stage never holds [b, T, V] logits, and vocab-parallel under tp (each rank's V/t rows of the head).

    By default the micro-batch's mean cross-entropy over the targets that are not IGNORE_INDEX, as
    LTModel.loss; the schedule averages them. `pipeline_step` switches it to `weight` times their summed
    cross-entropy (the training loop's answer-only loss), and counts loss and correct answers."""

    def __init__(self, model, microbatches: int, chunk: int = 1024):
        self.model = model  # the LTModel whose head the last stage holds (head_weight, logit scale and cap)
        self.microbatches = microbatches
        self.chunk = chunk
        self.weight: float | None = None
        self.calls: list[tuple[float, int]] = []  # (summed loss, correct) of each call since the last reset

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from ltmdsl.train.loss import summed_target_loss

        summed, correct, count = summed_target_loss(self.model, hidden, targets, self.chunk, IGNORE_INDEX)
        if self.weight is None:
            return summed / max(count, 1)
        self.calls.append((float(summed.detach()), correct))
        return summed * (self.weight * self.microbatches)  # the schedule (scale_grads) divides by micro-batches


class Stage(nn.Module):
    """Sub-layers `layers` of `model` (first stage: from token ids; last: to the final norm's output, which
    ScheduleLoss takes through the head)."""

    def __init__(self, model, layers: range, first: bool, last: bool):
        super().__init__()
        self.ir = model.ir
        self.first, self.last = first, last
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.uses = nn.ModuleDict({str(i): model.uses[str(i)] for i in layers if str(i) in model.uses})
        self.final_norm = model.final_norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ids [b, T] (first stage) or h [b, T, d] -> h [b, T, d]; on the last stage the normalised h."""
        h = self.embed(x) if self.first else x  # [b, T, d]
        pending = inject = None
        for i, block in self.layers.items():
            if block.wide or inject is not None:  # an injected branch or per-use parameters (no embeddings)
                use = self.uses[i] if i in self.uses else None
                h, pending, inject = block.flow(h, pending, inject, None, 0, False, self.ir.residual_scale, None, use)
            else:
                h, pending = block.advance(h, pending, None, 0, False, self.ir.residual_scale)  # [b, T, d] each
        if self.last:
            normed, _ = self.final_norm(h, None) if pending is None else self.final_norm(pending, h)
            return normed  # [b, T, d]: the head is applied by ScheduleLoss, chunked (never [b, T, V])
        return h if pending is None else pending + h  # the residual add the next stage's norm would do


def check_pipeline(ir, pp: int, interleave: int = 1) -> list[range]:
    """The ranges of the pp * interleave (virtual) stages, virtual stage s on pp rank s mod pp;
    PipelineUnsupported for tied embeddings, a tie group across ranks, or more stages than sub-layers."""
    if ir.tie_embeddings and pp > 1:
        raise PipelineUnsupported("pp > 1 with tied embeddings (the head is the first stage's embedding) is not "
                                  "supported yet")
    wide = next((x for x in ir.layers if x.residual.width != 1), None)
    if wide is not None and pp > 1:
        raise PipelineUnsupported(f"pp > 1 with layer {wide.index} '{wide.definition}', which reads the embeddings "
                                  "(input = concat_embed): pipeline stages do not send them on yet")
    stages = pp * interleave
    if stages > len(ir.layers):
        raise PipelineUnsupported(f"pp = {pp} x interleave = {interleave} stages exceed the {len(ir.layers)} "
                                  "sub-layers of the model")
    ranges = stage_ranges(len(ir.layers), stages)
    cut = next((ir.layers[r[-1]] for r in ranges[:-1] if ir.layers[r[-1]].residual.into != "residual"), None)
    if cut is not None:
        raise PipelineUnsupported(f"layer {cut.index} '{cut.definition}' sends its output into the next sub-layer's "
                                  "input (into = next_input) across a pipeline stage boundary, which is not sent on")
    rank_of = {i: s % pp for s, r in enumerate(ranges) for i in r}
    groups: dict = {}
    for layer in ir.layers:
        if layer.tie_group is not None:
            groups.setdefault((layer.tie_group, layer.tie_slot), set()).add(rank_of[layer.index])
    spread = [g for g, ranks in groups.items() if len(ranks) > 1]
    if spread:
        raise PipelineUnsupported(f"tie group '{spread[0][0]}' spans pipeline stages (one weight on two ranks)")
    return ranges


class RankStages(nn.Module):
    """The virtual stages one pp rank holds under an interleaved schedule (stages r, r + pp, ...), under
    the model's parameter names (embed, layers.<i>, final_norm, lm_head), so optimizers and checkpoints
    see one module; the schedule runs the stages themselves."""

    def __init__(self, stages: list[Stage]):
        super().__init__()
        self.ir = stages[0].ir
        self.stages = stages  # a plain list: the parameters are registered below, once, under model names
        self.first, self.last = stages[0].first, stages[-1].last
        self.embed = stages[0].embed
        self.layers = nn.ModuleDict({k: v for st in stages for k, v in st.layers.items()})
        self.uses = nn.ModuleDict({k: v for st in stages for k, v in st.uses.items()})
        self.final_norm = stages[-1].final_norm
        self.lm_head = stages[-1].lm_head
        self.loss = stages[-1].loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the pipeline schedule runs a rank's stages; call schedule.step, not the module")


def build_stage(model, pp_mesh, microbatches: int, interleave: int = 1):
    """(this pp rank's module, a function device -> its schedule). `model` is the meta LTModel. One stage
    per rank runs 1F1B; `interleave` > 1 gives each rank `interleave` virtual stages (stage s on rank
    s mod pp, Megatron's interleaving) run by torch's interleaved 1F1B."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    pp = pp_mesh.size()
    ranges = check_pipeline(model.ir, pp, interleave)
    r, n = pp_mesh.get_local_rank(), len(ranges)
    loss = ScheduleLoss(model, microbatches)
    if interleave == 1:
        stage = Stage(model, ranges[r], first=r == 0, last=r == n - 1)
        stage.loss = loss
        return stage, lambda device: Schedule1F1B(
            PipelineStage(stage, r, n, device, group=pp_mesh.get_group()), microbatches,
            loss_fn=loss, scale_grads=True)
    ids = list(range(r, n, pp))
    stages = [Stage(model, ranges[s], first=s == 0, last=s == n - 1) for s in ids]
    for stage in stages:
        stage.loss = loss
    held = RankStages(stages)
    return held, lambda device: ScheduleInterleaved1F1B(
        [PipelineStage(stage, s, n, device, group=pp_mesh.get_group()) for stage, s in zip(stages, ids)],
        microbatches, loss_fn=loss, scale_grads=True)


def _run_schedule(schedule, stage, input_ids: torch.Tensor, targets: torch.Tensor) -> list:
    """One forward and backward of a batch: the first stage feeds the ids, the last the targets; returns
    the last stage's per-micro-batch losses (empty elsewhere)."""
    if stage.first and stage.last:
        raise PipelineUnsupported("one stage is not a pipeline")
    losses: list = []
    if stage.first:
        schedule.step(input_ids)
    elif stage.last:
        schedule.step(target=targets, losses=losses)
    else:
        schedule.step()
    return losses


def pipeline_loss(schedule, stage: Stage, pp_mesh, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Run forward and backward of one batch through the pipeline; the mean loss (a 0-d tensor) on
    every pp rank (broadcast from the last stage)."""
    import torch.distributed as dist

    losses = _run_schedule(schedule, stage, input_ids, targets)
    # float64 on every stage: the last stage's loss is in the model's dtype, which the others do not know
    device = next(stage.parameters()).device  # NCCL broadcasts device tensors only
    loss = (torch.stack(losses).mean().detach().double() if stage.last
            else torch.zeros((), dtype=torch.float64, device=device))
    last = dist.get_global_rank(pp_mesh.get_group(), pp_mesh.size() - 1)
    dist.broadcast(loss, src=last, group=pp_mesh.get_group())
    return loss


def pipeline_step(schedule, stage: Stage, input_ids: torch.Tensor, targets: torch.Tensor,
                  weight: float, chunk: int = 1024) -> torch.Tensor:
    """Forward and backward of one batch whose loss is `weight` times the summed cross-entropy of the
    targets that are not IGNORE_INDEX (`chunk` answer rows at a time); returns [summed loss, correct
    answers] (float64), non-zero on the last stage only."""
    stage.loss.weight, stage.loss.calls, stage.loss.chunk = weight, [], chunk
    try:
        _run_schedule(schedule, stage, input_ids, targets)
        # The schedule's first step also runs the loss once while it infers shapes (on uninitialised
        # tensors); this step's micro-batches are the last `microbatches` calls.
        calls = stage.loss.calls[-stage.loss.microbatches:] if stage.last else []
        return torch.tensor([sum(c[0] for c in calls), sum(c[1] for c in calls)], dtype=torch.float64)
    finally:
        stage.loss.weight = None
