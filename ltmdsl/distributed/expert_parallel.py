"""Expert parallelism: each MoE layer's experts split over the ep ranks, tokens sent to them all-to-all.

Two layouts of the experts over a pipeline stage's tp*cp*dp ranks (`folds_experts` chooses):

Carved out of dp (etp = tp and ep dividing dp: Megatron-LM's and DeepSpeed-MoE's expert parallelism): the dp
ranks of the (pp, dp, cp, tp) mesh are unflattened into (edp, ep), ep innermost, so an ep group is ep
neighbouring dp ranks (with the same cp and tp coordinates) and the dp/ep ranks holding the same experts (the
"expert data-parallel" ranks, edp = dp/ep) are ep apart; under cp the experts' replicas are the edp x cp ranks.
Rank r of an ep group holds experts [r*E/ep, (r+1)*E/ep) of every MoE layer; under tensor parallelism each of
those experts' width F is split over the tp ranks as well (Megatron's expert tensor parallelism with its default
expert-tp = tp): the stacked expert weights are DTensors sharded on the expert axis over ep and on F over tp,
initialised shard by shard like every other parameter; expert biases (gpt-oss) likewise, split with their
experts (gate and up biases on F, the down bias on d: runtime/kinds/moe.py `Experts.add_down_bias`) and treated
as expert parameters by everything below. The router is replicated (dense). In forward every tp rank routes the
same tokens, sends each (token, slot) to the rank of its ep group holding its expert (all_to_all with uneven
splits), runs its experts' F/t slices on what it receives and sends the results back, where they are weighted,
summed as in one process and summed over tp (`ep_forward` on the moe runtime kind). Both all-to-alls are
autograd functions, so an expert's gradient collects every ep rank's tokens.

MoE parallel folding (Megatron-Core's, Liu et al. 2025, arXiv 2504.14960: any etp and ep whose product divides
the stage's tp*cp*dp ranks, the memory model's rank rule): the experts lay the stage's ranks out on their own,
in mesh order (tp innermost) cut into (edp, ep, etp), etp innermost, then ep, as Megatron-Core's expert rank
generator orders them ("tp-ep-dp-pp" with the expert-tp degree as tp and cp folded into expert-dp:
`fold_expert_mesh`). Rank r of an ep group (the ranks with the same edp and etp coordinates) holds experts
[r*E/ep, (r+1)*E/ep), each split over its etp group on the width F as above (whole at etp = 1). An etp group
need not lie inside one tp group (etp > tp, or etp not dividing tp), so every rank first keeps only its own
distinct share of the tokens, then:

    route      every tp rank routes its replica's tokens (the router's gradient is then whole on every tp rank,
               as a replicated weight's) and keeps its 1/t part of the rows (`ExpertShard.part`; a decode step
               whose few tokens t does not divide is dispatched whole by every rank: the same output, no
               gradient; the plan check makes t divide a rank's tokens in training)
    dispatch   all-to-all over the ep group, as above
    gather     the received rows all-gathered over the etp group (`gather_rows`, uneven), so each etp rank
               computes its F/etp slice of its E/ep experts on the rows of the whole etp group
    combine    the partial outputs reduce-scattered over the etp group (`scatter_rows`: each rank gets the sum
               over F of its own rows), all-to-all back, weighted and summed per token
    restore    the parts all-gathered over the tp group (`ExpertShard.whole`; their gradients cut back to the
               part), the layout every tp rank had before

Every (replica, part) pair is one rank of the stage, so each token is dispatched once. The expert replicas are
the edp ranks; an expert slice's local gradient sums the tokens of the ep*etp ranks of its edp block, and over
the edp blocks every token once, so it is scaled by edp / (dp*cp) (`grad_scale`: averaged over the edp replicas
it is the dp*cp mean, as a dense gradient).

Gradients and ZeRO, per parameter class (Megatron's expert data parallelism):
  dense   replicated over the dp x cp ranks: averaged over them, ZeRO state sharded over them
  expert  replicated over the expert replicas only (edp x cp carved out of dp, edp folded): averaged over them,
          ZeRO state (the distributed optimizer for ZeRO 1, FSDP2 for ZeRO 2/3) sharded over them. The step's
          loss is the mean of the dp*cp ranks' means; carved out of dp an expert's local gradient already sums
          its ep group's ep ranks' terms, so the expert weights' gradient is scaled by 1/ep as it leaves the
          experts (`ExpertShard.local`): averaged over the edp*cp replicas it is the dp*cp mean. (A gradient
          divide factor of dp*cp on the experts' FSDP2 unit would not: with a group of one rank torch 2.13's
          FSDP2 divides twice, and the pre-multiplied sum it selects in fp32 is NCCL-only.)
so each rank's expert state is E/ep experts F/etp wide, ZeRO-sharded over the expert replicas, max(1,
t*c*dp / (etp*ep)) of them: the memory model's count (ltmdsl/memory/training.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltmdsl.distributed.plan import folds_experts

#: the stacked expert parameters [E, ...] expert parallelism splits on the expert axis: the weights and, with
#: expert_bias (gpt-oss), their biases [E, F] and [E, d], each on the rank holding its expert
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias")


def runs_experts_apart(plan) -> bool:
    """Whether `plan` splits the experts apart from the dense layers at all: ep > 1, or folded at ep = 1 (etp
    other than tp: each expert's width over its own etp ranks, the experts replicated over the edp groups)."""
    return plan.ep > 1 or folds_experts(plan)


@dataclass(frozen=True)
class ExpertShard:
    """This rank's place among the ep ranks, the ranks holding its experts, and the token exchanges of
    ep_forward."""

    mesh: object  # 1-D DeviceMesh of the ep ranks (same tp and cp coordinates; folded: stage ranks etp apart)
    rank: int
    size: int
    replicas: object  # 1-D DeviceMesh of the ranks holding the same experts (edp x cp): gradient average, ZeRO
    fold: object = None  # folded under tp: the tp mesh, each rank dispatching its 1/t part of the tokens
    grad_scale: float | None = None  # the experts' gradient factor; None: 1/ep (module docstring)
    etp: object = None  # folded at etp > 1: the 1-D mesh of the etp group, over which received rows are gathered

    def local(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a stacked expert weight [E, ...] -> [E/ep, ...] (differentiable), its
        gradient scaled by 1/ep or `grad_scale` (module docstring)."""
        scale = 1.0 / self.size if self.grad_scale is None else self.grad_scale
        return _ScaleGradient.apply(p.to_local() if hasattr(p, "to_local") else p, scale)

    def folds(self, rows: int) -> bool:
        """Whether this rank dispatches only its part of `rows` tokens: folded under tp, and t divides them. (A
        decode step's few tokens that t does not divide are dispatched by every tp rank, each getting all
        their results back: the same output, no gradient; training's plan check makes t divide a rank's
        tokens.)"""
        return self.fold is not None and rows % self.fold.size() == 0

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """Folded: this tp rank's rows of t [M, ...], whole on every tp rank -> [M/t, ...] (backward: the
        parts' gradients all-gathered, whole on every rank)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not t.is_floating_point():  # routed expert ids: no gradient
            return t.chunk(self.fold.size())[self.fold.get_local_rank()]
        return DTensor.from_local(t, self.fold, [Replicate()], run_check=False).redistribute(
            self.fold, [Shard(0)]).to_local()

    def whole(self, t: torch.Tensor) -> torch.Tensor:
        """Folded: every tp rank's part [M/t, ...] all-gathered -> [M, ...] (backward: this rank's rows of the
        gradient, whole on every rank)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        return DTensor.from_local(t, self.fold, [Shard(0)], run_check=False).redistribute(
            self.fold, [Replicate()]).to_local()

    def counts(self, send: torch.Tensor) -> torch.Tensor:
        """How many rows each rank sends here, given how many this rank sends to each: [ep] -> [ep]."""
        import torch.distributed as dist

        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.mesh.get_group())
        return recv

    def exchange(self, t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows of t [sum(send), ...] to their ranks -> the rows sent here [sum(recv), ...] (autograd)."""
        from torch.distributed.nn.functional import all_to_all_single

        out = t.new_empty((sum(recv), *t.shape[1:]))
        return all_to_all_single(out, t.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                                 group=self.mesh.get_group())

    def exchange_ids(self, t: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """As `exchange` for integer ids (no gradient)."""
        import torch.distributed as dist

        out = t.new_empty(sum(recv))
        dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=self.mesh.get_group())
        return out

    def gathered(self, rows: int, device) -> list[int] | None:
        """Folded at etp > 1: how many rows each rank of the etp group received, [etp] (a collective); None
        when the received rows are not gathered (etp = 1, or ep carved out of dp)."""
        import torch.distributed as dist

        if self.etp is None:
            return None
        mine = torch.tensor([rows], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.etp.size())]
        dist.all_gather(every, mine, group=self.etp.get_group())
        return [int(n) for n in torch.cat(every).tolist()]

    def gather_rows(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every etp rank's received rows, in etp-rank order: t [counts[me], ...] -> [sum(counts), ...]
        (backward: the gradient's rows of this rank summed over the etp group)."""
        return _GatherRows.apply(t, counts, self.etp.get_group())

    def gather_ids(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """As `gather_rows` for integer ids (no gradient)."""
        return _all_gather_rows(t, counts, self.etp.get_group())

    def scatter_rows(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The etp group's partial results [sum(counts), ...] summed over its ranks, each keeping its own rows
        -> [counts[me], ...] (a reduce-scatter; backward: the gradient's rows all-gathered)."""
        return _ScatterRows.apply(t, counts, self.etp.get_group())


def _all_gather_rows(t: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Uneven all-gather: rank i's rows t [counts[i], ...] -> every rank's, in rank order [sum(counts), ...]
    (padded to the largest count for the collective, the padding cut)."""
    import torch.distributed as dist

    most = max(max(counts), 1)  # (one row at least: no empty collective)
    padded = t.new_zeros((most, *t.shape[1:]))  # [max, ...]
    padded[:t.shape[0]] = t
    every = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(every, padded, group=group)
    return torch.cat([rows[:n] for rows, n in zip(every, counts)])  # [sum(counts), ...]


def _reduce_scatter_rows(t: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Uneven reduce-scatter: t [sum(counts), ...] on every rank -> the sum over the ranks of rows
    [offset_i, offset_i + counts[i]) on rank i [counts[i], ...], summed in rank order (an all-to-all: gloo has
    no uneven reduce-scatter)."""
    import torch.distributed as dist

    mine = counts[dist.get_rank(group)]
    out = t.new_empty((mine * len(counts), *t.shape[1:]))  # [etp * counts[me], ...]
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=[mine] * len(counts), input_split_sizes=counts,
                           group=group)
    return out.view(len(counts), mine, *t.shape[1:]).sum(0)  # [counts[me], ...]


class _GatherRows(torch.autograd.Function):
    """`ExpertShard.gather_rows`: all-gather forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, counts: list[int], group) -> torch.Tensor:
        ctx.counts, ctx.group = counts, group
        return _all_gather_rows(t, counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_rows(grad, ctx.counts, ctx.group), None, None


class _ScatterRows(torch.autograd.Function):
    """`ExpertShard.scatter_rows`: reduce-scatter forward, all-gather backward."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, counts: list[int], group) -> torch.Tensor:
        ctx.counts, ctx.group = counts, group
        return _reduce_scatter_rows(t, counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_rows(grad.contiguous(), ctx.counts, ctx.group), None, None


class _ScaleGradient(torch.autograd.Function):
    """x unchanged; its gradient times `scale` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def expert_mesh(mesh, plan):
    """Carved out of dp: the plan's mesh with its dp dimension unflattened into (edp, ep), ep innermost:
    ("pp", "edp", "ep", "cp", "tp"), the same ranks in the same order. Creates process groups: call once."""
    return mesh._unflatten("dp", (plan.dp // plan.ep, plan.ep), ("edp", "ep"))


def fold_expert_mesh(mesh, plan):
    """MoE parallel folding (module docstring): a ("pp", "edp", "ep", "etp") mesh over the same ranks, the
    stage's dp x cp x tp ranks in mesh order cut into edp x ep x etp, etp innermost. Creates process groups:
    call once."""
    from torch.distributed.device_mesh import init_device_mesh

    etp, stage = plan.expert_tp, plan.tp * plan.cp * plan.dp
    return init_device_mesh(mesh.device_type, (plan.pp, stage // (etp * plan.ep), plan.ep, etp),
                            mesh_dim_names=("pp", "edp", "ep", "etp"))


def apply_expert_parallel(model, mesh, plan) -> set[int]:
    """Shard the stacked expert weights of every MoE mixer over the ep ranks of `mesh` (the plan's (pp, dp,
    cp, tp) mesh; the meta model, before FSDP2 and materialise; under tp after the tp split, which carved out
    of dp made them DTensors over F and folded left them whole) as stacked [E, ...] DTensors, Shard(0) over ep
    and, under (e)tp, Shard on their width (runtime/kinds/moe.py `EXPERT_WIDTHS`) over the (e)tp ranks, and
    switch the mixers to ep_forward; returns the ids of the sharded parameters."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from ltmdsl.runtime.kinds import runtime_kind
    from ltmdsl.runtime.kinds.moe import EXPERT_WIDTHS

    folded = folds_experts(plan)
    if folded:
        experts_mesh = fold_expert_mesh(mesh, plan)
        ep_mesh, replicas = experts_mesh["ep"], experts_mesh["edp"]
        etp = experts_mesh["etp"] if plan.expert_tp > 1 else None
        shard = ExpertShard(ep_mesh, ep_mesh.get_local_rank(), ep_mesh.size(), replicas,
                            fold=mesh["tp"] if plan.tp > 1 else None,
                            grad_scale=replicas.size() / (plan.dp * plan.cp), etp=etp)
        width_mesh = ("ep", "etp") if etp is not None else None  # each expert's F split over its etp group
    else:
        experts_mesh = expert_mesh(mesh, plan)
        ep_mesh = experts_mesh["ep"]
        replicas = experts_mesh["edp"] if plan.cp == 1 else experts_mesh["edp", "cp"]._flatten("edp_cp")
        shard = ExpertShard(ep_mesh, ep_mesh.get_local_rank(), ep_mesh.size(), replicas)
        width_mesh = ("ep", "tp") if plan.tp > 1 else None
    sharded: set[int] = set()
    done: set[int] = set()
    for layer, block in zip(model.ir.layers, model.layers):
        kind = runtime_kind(layer.kind)
        if getattr(kind, "ep_forward", None) is None or id(block) in done:
            continue
        done.add(id(block))
        experts = block.mixer.experts
        for name in EXPERT_WEIGHTS:
            p = getattr(experts, name)
            if p is None:
                continue
            whole = torch.empty(p.shape, dtype=p.dtype, device="meta")  # [E, ...] global (a tp DTensor's too)
            if width_mesh is None:  # whole experts over ep
                d = distribute_tensor(whole, ep_mesh, [Shard(0)], src_data_rank=None)
            else:  # experts over ep, each one's width over its (e)tp ranks
                d = distribute_tensor(whole, experts_mesh[width_mesh], [Shard(0), Shard(EXPERT_WIDTHS[name])],
                                      src_data_rank=None)
            d = torch.nn.Parameter(d, requires_grad=p.requires_grad)
            setattr(experts, name, d)
            sharded.add(id(d))
        if folded:  # the down bias's d/etp slice is placed by the etp rank (none: whole at etp = 1)
            experts.tp_mesh = shard.etp
        block.mixer.expert_parallel = shard
    return sharded


def expert_shard(model) -> ExpertShard | None:
    """The ExpertShard of a model's (or pipeline stage's) MoE mixers; None without expert parallelism."""
    return next((m.expert_parallel for m in model.modules() if getattr(m, "expert_parallel", None) is not None),
                None)


def expert_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters expert parallelism split (the stacked expert weights and biases of the MoE mixers under
    ep)."""
    out = []
    for m in model.modules():
        if getattr(m, "expert_parallel", None) is not None:
            out += [p for name in EXPERT_WEIGHTS if (p := getattr(m.experts, name)) is not None]
    return out
