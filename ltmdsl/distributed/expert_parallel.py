"""Expert parallelism: each MoE layer's experts split over the ep ranks, tokens sent to them all-to-all.

The ep ranks are carved out of the data-parallel ranks, as Megatron-LM and DeepSpeed-MoE do: the dp ranks of
the (pp, dp, cp, tp) mesh are unflattened into (edp, ep), ep innermost, so an ep group is ep neighbouring dp
ranks (with the same cp and tp coordinates) and the dp/ep ranks holding the same experts (the "expert
data-parallel" ranks, edp = dp/ep) are ep apart; under cp the experts' replicas are the edp x cp ranks. Rank r of an ep group holds experts [r*E/ep, (r+1)*E/ep) of every MoE layer; under tensor parallelism
each of those experts' width F is split over the tp ranks as well (Megatron's expert tensor parallelism with
its default expert-tp = tp): the stacked expert weights are DTensors sharded on the expert axis over ep and on
F over tp, initialised shard by shard like every other parameter; expert biases (gpt-oss) likewise, split with
their experts (gate and up biases on F, the down bias on d under tp: runtime/kinds/moe.py `Experts.add_down_bias`)
and treated as expert parameters by everything below. The router is replicated (dense).

In forward each rank routes its own tokens, sends each (token, slot) to the rank of its ep group holding its
expert (all_to_all with uneven splits), runs its experts on what it receives, and sends the results back,
where they are weighted and summed as in one process (`ep_forward` on the moe runtime kind). Both
all-to-alls are autograd functions, so an expert's gradient collects every ep rank's tokens.

Gradients and ZeRO, per parameter class (Megatron's expert data parallelism):
  dense   replicated over the dp x cp ranks: averaged over them, ZeRO state sharded over them
  expert  replicated over the edp x cp ranks only: averaged over them, ZeRO state (the distributed optimizer
          for ZeRO 1, FSDP2 for ZeRO 2/3) sharded over them. The step's loss is the mean of the dp*cp ranks'
          means, and an expert's local gradient already sums its ep group's ep ranks' terms, so the expert
          weights' gradient is scaled by 1/ep as it leaves the experts (`ExpertShard.local`): averaged over
          the edp*cp replicas it is the dp*cp mean, as a dense gradient. (A gradient divide factor of dp*cp on
          the experts' FSDP2 unit would not: with a group of one rank torch 2.13's FSDP2 divides twice, and
          the pre-multiplied sum it selects in fp32 is NCCL-only.)
so each rank's expert state is (E/ep experts) / (dp*cp/ep): the memory model's expert parameters / (t*ep),
ZeRO-sharded over max(1, dp*c/ep) (ltmdsl/memory/training.py).

MoE parallel folding (Megatron-Core's, etp < tp: `fold_expert_mesh`): the experts lay the tp*cp*dp ranks of a
pipeline stage out on their own, the stage's ranks in mesh order (tp innermost) cut into (edp, ep, etp) with etp
innermost, then ep, as Megatron-Core's parallel_state builds its expert groups (its expert rank generator's order
"tp-ep-dp-pp" with the expert-tp degree as tp and cp folded into expert-dp). Since etp divides tp, an etp group
is etp neighbouring ranks of one tp group; rank r of an ep group (the ranks with the same edp and etp
coordinates) holds experts [r*E/ep, (r+1)*E/ep), each split over its etp group on the width F as the etp = tp
path splits them (gate and up by F, down by F, the down bias by d); at etp = 1 they are whole. The tp ranks of
one replica see the same tokens: they form t/etp etp groups, and etp group g (`fold`, the ranks of the tp group
with the same etp coordinate) routes all of them (the router's gradient is then whole on every tp rank, as a
replicated weight's) but dispatches only its part g of the rows, 1/(t/etp) of them, its etp ranks the same
part; the experts' partial outputs are summed over the etp group (as at etp = tp) and the parts all-gathered
over `fold` (`ExpertShard.whole`; their gradients are cut back to the part). The expert replicas are the edp
ranks; an expert slice's local gradient sums the parts of its ep group's ranks, which with the edp replicas are
every (replica, part) pair once, so it is scaled by edp / (dp*cp) = t / (etp*ep) (`grad_scale`: averaged over the
edp replicas it is the dp*cp mean). Each rank's expert state is then E/ep experts F/etp wide, ZeRO-sharded over
edp = t*c*dp / (etp*ep): the memory model's count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the stacked expert parameters [E, ...] expert parallelism splits on the expert axis: the weights and, with
#: expert_bias (gpt-oss), their biases [E, F] and [E, d], each on the rank holding its expert
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias")


@dataclass(frozen=True)
class ExpertShard:
    """This rank's place among the ep ranks, the ranks holding its experts, and the token exchange of
    ep_forward."""

    mesh: object  # 1-D DeviceMesh of the ep ranks (same tp and cp coordinates; folded: consecutive stage ranks)
    rank: int
    size: int
    replicas: object  # 1-D DeviceMesh of the ranks holding the same experts (edp x cp): gradient average, ZeRO
    fold: object = None  # folded (etp < tp): the t/etp ranks of the tp group with this etp coordinate, each
    # dispatching its 1/(t/etp) part of the tokens (the tp mesh at etp = 1)
    grad_scale: float | None = None  # the experts' gradient factor; None: 1/ep (module docstring)

    def local(self, p: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a stacked expert weight [E, ...] -> [E/ep, ...] (differentiable), its
        gradient scaled by 1/ep (module docstring)."""
        scale = 1.0 / self.size if self.grad_scale is None else self.grad_scale
        return _ScaleGradient.apply(p.to_local() if hasattr(p, "to_local") else p, scale)

    def folds(self, rows: int) -> bool:
        """Whether this rank dispatches only its part of `rows` tokens: folded, and t/etp divides them. (A
        decode step's few tokens that t/etp does not divide are dispatched by every etp group, each getting all
        their results back: the same output, no gradient; training's plan check makes t/etp divide a rank's
        tokens.)"""
        return self.fold is not None and rows % self.fold.size() == 0

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """Folded: this etp group's rows of t [M, ...], whole on every tp rank -> [M*etp/t, ...] (backward: the
        parts' gradients all-gathered, whole on every rank)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not t.is_floating_point():  # routed expert ids: no gradient
            return t.chunk(self.fold.size())[self.fold.get_local_rank()]
        return DTensor.from_local(t, self.fold, [Replicate()], run_check=False).redistribute(
            self.fold, [Shard(0)]).to_local()

    def whole(self, t: torch.Tensor) -> torch.Tensor:
        """Folded: every etp group's part [M*etp/t, ...] all-gathered -> [M, ...] (backward: this rank's rows of
        the gradient, whole on every rank)."""
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
    """The plan's mesh with its dp dimension unflattened into (edp, ep), ep innermost:
    ("pp", "edp", "ep", "cp", "tp"), the same ranks in the same order. Creates process groups: call once."""
    return mesh._unflatten("dp", (plan.dp // plan.ep, plan.ep), ("edp", "ep"))


def fold_expert_mesh(mesh, plan):
    """MoE parallel folding at etp < tp (module docstring): a ("pp", "edp", "ep", "etp") mesh over the same
    ranks, the stage's dp x cp x tp ranks in mesh order cut into edp x ep x etp, etp innermost. Creates process
    groups: call once."""
    from torch.distributed.device_mesh import init_device_mesh

    etp, stage = plan.expert_tp, plan.tp * plan.cp * plan.dp
    return init_device_mesh(mesh.device_type, (plan.pp, stage // (etp * plan.ep), plan.ep, etp),
                            mesh_dim_names=("pp", "edp", "ep", "etp"))


def fold_parts_mesh(mesh, plan):
    """The ranks of this rank's tp group whose etp groups own the other parts of its tokens (the tp ranks with
    its etp coordinate: tp rank i owns part i // etp): the tp mesh itself at etp = 1. Creates process groups
    (etp > 1): call once."""
    etp = plan.expert_tp
    if etp == 1:
        return mesh["tp"]
    return mesh._unflatten("tp", (plan.tp // etp, etp), ("tp_parts", "etp"))["tp_parts"]


def apply_expert_parallel(model, mesh, plan) -> set[int]:
    """Shard the stacked expert weights of every MoE mixer over the ep ranks of `mesh` (the plan's (pp, dp,
    cp, tp) mesh; the meta model, before FSDP2 and materialise; under tp after the tp split, which at etp = tp
    made them DTensors over F and below it left them whole) as stacked [E, ...] DTensors, Shard(0) over ep and,
    under (e)tp, Shard on their width (runtime/kinds/moe.py `EXPERT_WIDTHS`) over the (e)tp ranks, and switch
    the mixers to ep_forward; returns the ids of the sharded parameters."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from ltmdsl.runtime.kinds import runtime_kind
    from ltmdsl.runtime.kinds.moe import EXPERT_WIDTHS

    folded = plan.expert_tp < plan.tp
    if folded:
        experts_mesh = fold_expert_mesh(mesh, plan)
        ep_mesh, replicas = experts_mesh["ep"], experts_mesh["edp"]
        shard = ExpertShard(ep_mesh, ep_mesh.get_local_rank(), ep_mesh.size(), replicas,
                            fold=fold_parts_mesh(mesh, plan), grad_scale=replicas.size() / (plan.dp * plan.cp))
        width_mesh = ("ep", "etp") if plan.expert_tp > 1 else None  # each expert's F split over its etp group
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
        if folded:  # the experts' partial sums over their etp group (none: whole at etp = 1)
            experts.tp_mesh = experts_mesh["etp"] if plan.expert_tp > 1 else None
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
