"""Sparse mixture-of-experts feed-forward sub-layer: a router, E stacked experts and an optional shared expert.

Routing (ltmdsl/kinds/moe.py states it in full): scores s = softmax or sigmoid of the router logits; the
k experts are chosen on s (+ the selection bias), within the `top_groups` best of `groups` expert groups;
their weights are s at those experts, renormalised when the routing says so, times `routed_scale`
(topk_softmax: a softmax over the k chosen logits). The weighted expert outputs (or, with `weight_input`,
the outputs of the weighted inputs) are summed, plus the shared expert, gated by sigmoid(shared_gate(x))
when it has a gate.
Expert weights are stacked: gate_proj/up_proj [E, F, d], down_proj [E, d, F] (transformers' layout), with
biases gate_bias/up_bias [E, F] and down_bias [E, d] when `expert_bias`; the activations are the MLP's
(runtime/kinds/mlp.py) plus gpt-oss's clamped SwiGLU. The selection bias is a buffer `selection_bias` [E]
(in the state dict, not a parameter: transformers does not count it either). Every token's k experts are
computed exactly (no capacity limit, no dropped tokens).

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, no cache, no kernel ops and its
parameter names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.mlp import MLPConfig
from ltmdsl.kinds.moe import MoEConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, cp_local
from ltmdsl.runtime.kinds.mlp import MLP, activate
from ltmdsl.runtime.tensor_parallel import copy_to_tp, local, shard_parameters, sum_over_tp

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels


def expert_activation(cfg: MoEConfig, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """gate, up [m, F] -> [m, F]: the MLP activations, or gpt-oss's clamped SwiGLU
    g = min(gate, limit), u = clamp(up, -limit, limit), g * sigmoid(alpha * g) * (u + 1)."""
    if cfg.activation != "swiglu_clamped":
        return activate(cfg.activation, gate, up)
    g = gate.clamp(max=cfg.swiglu_limit)  # [m, F]
    u = up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)  # [m, F]
    return g * torch.sigmoid(cfg.swiglu_alpha * g) * (u + 1)


class Experts(nn.Module):
    """Stacked expert weights: gate_proj [E,F,d] (gated only), up_proj [E,F,d], down_proj [E,d,F], and biases."""

    def __init__(self, E: int, F_: int, d: int, gated: bool, bias: bool):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(E, F_, d)) if gated else None
        self.up_proj = nn.Parameter(torch.empty(E, F_, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, F_))
        self.gate_bias = nn.Parameter(torch.empty(E, F_)) if gated and bias else None
        self.up_bias = nn.Parameter(torch.empty(E, F_)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(E, d)) if bias else None

    def init_weights(self, gen: torch.Generator) -> None:
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            if p is not None:
                init.normal_(p, gen)
        for p in (self.gate_bias, self.up_bias, self.down_bias):
            if p is not None:
                init.zeros_(p)

    tp_mesh = None  # set by tp_plan's style: the weights are this tp rank's F/t slice of every expert

    def forward(self, cfg: MoEConfig, rx: torch.Tensor, rows_of, ep) -> torch.Tensor:
        """Expert parallelism's expert maths (`ep_experts`): this rank's E/ep experts on the rows rx [R, d]
        received from the ep ranks, rows_of(e) the rows [m] of local expert e -> [R, d]. A module call, so that
        FSDP2 (ZeRO 2/3 over the ranks holding the same experts) gathers the expert weights around it and
        reduce-scatters their gradients after its backward.

        Each expert weight's local view is taken once (its backward sums every expert's gradient into one
        [E/ep, ...] buffer, not one per expert); the experts' results are added in place."""
        def mine(p):  # this rank's experts of a stacked weight or bias, None for an absent one
            return None if p is None else ep.local(p)

        gate_w, up_w, down_w = mine(self.gate_proj), mine(self.up_proj), mine(self.down_proj)  # [E/ep, F(/t), d] ..
        biases = mine(self.gate_bias), mine(self.up_bias), mine(self.down_bias)  # [E/ep, F], [E/ep, F], [E/ep, d]
        # [R, d]: tied to rx and this rank's expert weights even when no row comes here (R = 0), so that every
        # rank's backward runs both all-to-alls (a rank whose graph skipped them would leave its peers waiting)
        # and its experts get a (zero) gradient, as the stacked expert weights of one process do. The weights'
        # zero is added in place: `rx * 0 + held * 0` held a third [R, d] buffer beside rx and ry for a moment
        held = sum(w_.sum() for w_ in (gate_w, up_w, down_w, *biases) if w_ is not None)
        ry = (rx * 0).add_(held * 0)  # [R, d]
        for e in range(up_w.shape[0]):
            rows = rows_of(e)  # [m]
            if rows.numel() == 0:
                continue
            gate_e = None if gate_w is None else gate_w[e]  # [F(/t), d]
            bias_e = tuple(None if b is None else b[e] for b in biases)  # [F], [F], [d]
            ry.index_add_(0, rows, _local_expert(cfg, rx[rows], gate_e, up_w[e], down_w[e], *bias_e,
                                                 add_down_bias=self.add_down_bias))  # [m, d] into [R, d]
        return ry

    def one(self, cfg: MoEConfig, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [m, d] -> [m, d] (under tensor parallelism: this rank's part of the sum
        over the expert's width, reduced by `MoE.forward`)."""
        gate = x @ local(self.gate_proj)[e].t() if self.gate_proj is not None else None  # [m, F]
        up = x @ local(self.up_proj)[e].t()  # [m, F]
        if self.up_bias is not None:  # [F(/t)] each: split over the expert's width like the weights
            up = up + local(self.up_bias)[e]
            gate = gate + local(self.gate_bias)[e] if gate is not None else None
        out = expert_activation(cfg, gate, up) @ local(self.down_proj)[e].t()  # [m, d]
        return out if self.down_bias is None else self.add_down_bias(out, local(self.down_bias)[e])

    def add_down_bias(self, out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """out [m, d] (under tensor parallelism this rank's partial sum over the expert's width) plus the down
        projection's bias: the whole bias [d], or under tensor parallelism this rank's d/t slice of it [d/t]
        (the bias split over d, Shard(1), like the weights' F) added into its columns only, so the sum over
        the tp ranks adds it once, and its gradient (the reduced output's, the same on every rank) is exactly
        its slice's. Megatron-LM adds a row-parallel bias after the reduction; the slice keeps it inside the
        expert, where expert parallelism holds it."""
        if self.tp_mesh is None:
            return out + bias  # [m, d]
        d, n = out.shape[-1], bias.shape[-1]
        start = self.tp_mesh.get_local_rank() * -(-d // self.tp_mesh.size())  # torch's Shard(1): chunks of ceil
        return out + F.pad(bias, (start, d - start - n))  # [m, d]: the slice at its columns, zeros elsewhere


def route(logits: torch.Tensor, cfg: MoEConfig,
          selection_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [M, E] -> (weights [M, k] in the logits' work dtype, expert indices [M, k])."""
    work = logits.double() if logits.dtype == torch.float64 else logits.float()
    k = cfg.top_k
    if cfg.routing == "topk_softmax":
        top, idx = torch.topk(work, k, dim=-1)  # [M, k]
        return torch.softmax(top, dim=-1) * cfg.routed_scale, idx
    if cfg.score == "softmax":
        scores = torch.softmax(work, dim=-1)  # [M, E]
    elif cfg.score == "sigmoid":
        scores = torch.sigmoid(work)  # [M, E]
    else:
        raise ValueError(f"unknown MoE routing {cfg.routing!r}")
    choice = scores if selection_bias is None else scores + selection_bias.to(work.dtype)  # [M, E]
    if cfg.groups > 1:
        M, G = choice.shape[0], cfg.groups
        grouped = choice.view(M, G, -1)  # [M, G, E/G]
        if cfg.group_score == "top2_sum":
            gscore = grouped.topk(2, dim=-1).values.sum(-1)  # [M, G]
        else:
            gscore = grouped.max(dim=-1).values  # [M, G]
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(cfg.top_groups, dim=-1).indices, True)
        choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape_as(choice), float("-inf"))
    idx = torch.topk(choice, k, dim=-1).indices  # [M, k]
    w = scores.gather(1, idx)  # [M, k]
    if cfg.renormalise:
        w = w / w.sum(-1, keepdim=True)
    return w * cfg.routed_scale, idx


class MoE(nn.Module):
    """Top-k mixture of experts: x [..., d] -> [..., d]; names router.*, experts.*, shared.*, shared_gate.weight."""

    def __init__(self, cfg: MoEConfig, d: int):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(d, cfg.experts, bias=cfg.router_bias)
        self.experts = Experts(cfg.experts, cfg.d_ff, d, cfg.gated, cfg.expert_bias)
        if cfg.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(cfg.experts))
        else:
            self.selection_bias = None
        self.shared = MLP(MLPConfig(cfg.shared_d_ff, cfg.activation, False), d) if cfg.shared_d_ff else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if cfg.shared_gate else None
        self.expert_parallel = None  # set by ltmdsl.distributed.expert_parallel: forward runs ep_forward

    def init_weights(self, gen: torch.Generator) -> None:
        init.linear_(self.router, gen)
        self.experts.init_weights(gen)
        if self.selection_bias is not None:
            init.zeros_(self.selection_bias)
        if self.shared is not None:
            self.shared.init_weights(gen)
        if self.shared_gate is not None:
            init.linear_(self.shared_gate, gen)

    def forward(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        if self.expert_parallel is not None:
            return ep_forward(self, x, self.expert_parallel)
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [M, d]
        return with_shared(self, xf, self.routed(xf)).view(shape)

    def routed(self, xf: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum over the tokens xf [M, d] -> [M, d]. A function of its own so that
        the routing weights, the indices and the last expert's rows are released on return, before the shared
        expert runs (`with_shared`): the loop's variables had held the last expert's [m, d] output through it."""
        cfg = self.cfg
        w, idx = route(self.router(xf), cfg, self.selection_bias)  # [M, k], [M, k]
        xe = xf
        if self.experts.tp_mesh is not None:  # the experts' inputs get partial gradients from each rank
            group = self.experts.tp_mesh.get_group()
            xe, w = copy_to_tp(xf, group), copy_to_tp(w, group)
        out = torch.zeros_like(xf)  # [M, d]
        for e in range(cfg.experts):
            tok, slot = torch.where(idx == e)  # tokens routed to expert e, and which of their k slots
            if tok.numel() == 0:
                continue
            we = w[tok, slot, None].to(xf.dtype)  # [m, 1]
            if cfg.weight_input:
                he = self.experts.one(cfg, e, xe[tok] * we)  # [m, d]
            else:
                he = self.experts.one(cfg, e, xe[tok]) * we  # [m, d]
            out.index_add_(0, tok, he.to(out.dtype))
        if self.experts.tp_mesh is not None:
            out = sum_over_tp(out, self.experts.tp_mesh)  # [M, d]
        return out

    def step(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        return self.forward(x)


def build(cfg: MoEConfig, d: int, eps: float, kernels: "Kernels") -> MoE:
    """The uniform constructor of the registry (a MoE needs neither a norm eps nor kernels)."""
    return MoE(cfg, d)


def outputs(cfg: MoEConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): the experts' down_proj [E, d, F] and the shared
    expert's, each reading the activation of two small projections (no norm)."""
    out = {"experts.down_proj": False}
    if cfg.shared_d_ff:
        out["shared.down_proj.weight"] = False
    return out


def state_names(cfg: MoEConfig) -> tuple[str, ...]:
    """The state a `MoE` owns: the router (and its bias), the stacked experts (gate_proj only when gated,
    biases with expert_bias), the selection-bias buffer, the shared expert and its gate."""
    experts = (["gate_proj"] if cfg.gated else []) + ["up_proj", "down_proj"]
    if cfg.expert_bias:
        experts += (["gate_bias"] if cfg.gated else []) + ["up_bias", "down_bias"]
    names = ["router.weight", *(["router.bias"] if cfg.router_bias else []), *(f"experts.{p}" for p in experts)]
    if cfg.selection_bias:
        names.append("selection_bias")
    if cfg.shared_d_ff:
        names += [f"shared.{p}.weight" for p in (["gate_proj"] if cfg.gated else []) + ["up_proj", "down_proj"]]
    if cfg.shared_gate:
        names.append("shared_gate.weight")
    return tuple(names)


#: the dimension of each stacked expert parameter that (expert) tensor parallelism splits: the expert width F of
#: gate_proj/up_proj [E, F, d], down_proj [E, d, F] and the gate and up biases [E, F]; d of the down bias [E, d]
#: (`Experts.add_down_bias`)
EXPERT_WIDTHS = {"gate_proj": 1, "up_proj": 1, "down_proj": 2, "gate_bias": 1, "up_bias": 1, "down_bias": 1}


def tp_plan(cfg: MoEConfig, tp: int, expert_tp: int | None = None) -> dict:
    """Every expert's width split over tp (gate and up by F, down by F), the shared expert split as an MLP
    (column-wise in, row-wise out); router and shared gate replicated (same input, same gradient on every
    rank). Expert biases (gpt-oss): gate and up biases by F with their weights, the down bias by d, each rank
    adding its d/t slice into its partial output (`Experts.add_down_bias`), so it is added once and every
    expert parameter is split over tp (the memory model's expert parameters / (t*ep)).

    `expert_tp` other than tp (MoE parallel folding, ltmdsl.distributed.expert_parallel): the routed experts
    are left whole here, for expert parallelism to split over its own etp ranks, so tp need not divide d_ff
    (etp must: the plan check's rule); the shared expert, dense, is still split over tp."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    folded = expert_tp is not None and expert_tp != tp
    bad = ([f"expert width d_ff = {cfg.d_ff}"] if not folded and cfg.d_ff % tp else []) \
        + ([f"shared_d_ff = {cfg.shared_d_ff}"] if cfg.shared_d_ff and cfg.shared_d_ff % tp else [])
    if bad:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the moe's {' and '.join(bad)}")
    plan = {}
    if not folded:
        plan["experts"] = shard_parameters({name: dim for name, dim in EXPERT_WIDTHS.items()
                                            if cfg.expert_bias or not name.endswith("_bias")})
    if cfg.shared_d_ff:
        plan |= {"shared.up_proj": ColwiseParallel(), "shared.down_proj": RowwiseParallel()}
        if cfg.gated:
            plan["shared.gate_proj"] = ColwiseParallel()
    return plan


def ep_forward(module: MoE, x: torch.Tensor, ep) -> torch.Tensor:
    """Expert parallelism (ltmdsl.distributed.expert_parallel.ExpertShard `ep`): x [..., d] -> [..., d].
    Each (token, slot) goes to the rank holding its expert, sorted by expert; that rank runs its E/ep
    experts and returns the rows; they are weighted and summed per token in expert order, as forward does
    (every routing, the clamped SwiGLU, weighted inputs), and the shared expert (dense) added on this rank's
    tokens. Folded (MoE parallel folding: `ep.fold`, `ep.etp`) every tp rank routes its tokens but dispatches
    only its 1/t part of them; at etp > 1 the rows each rank receives are all-gathered over its etp group, whose
    ranks each hold F/etp of the experts' width, and the partial outputs reduce-scattered back; the parts are
    all-gathered over the tp ranks. Expert biases (gpt-oss) are split with their experts and added by the rank
    holding them."""
    shape = x.shape
    whole = x.reshape(-1, shape[-1])  # [M, d]
    return with_shared(module, whole, ep_routed(module, whole, ep)).view(shape)


def ep_routed(module: MoE, whole: torch.Tensor, ep) -> torch.Tensor:
    """`ep_forward`'s routed experts over the tokens whole [M, d] -> [M, d]: the routing, the plan and the
    exchanges (`ep_experts`); folded, this rank's part of them, the parts gathered. Its routing weights and
    int64 plan (indices, order, tokens, received experts) are released on return, before the shared expert runs."""
    cfg = module.cfg
    w, idx = route(module.router(whole), cfg, module.selection_bias)  # [M, k], [M, k]
    fold = ep.folds(whole.shape[0])
    xf, w, idx = (ep.part(whole), ep.part(w), ep.part(idx)) if fold else (whole, w, idx)  # folded: M/t rows
    M, k = xf.shape[0], cfg.top_k
    per = cfg.experts // ep.size
    order = torch.argsort(idx.flatten(), stable=True)  # assignments grouped by expert (hence by rank)
    expert = idx.flatten()[order]  # [M*k]
    tok = torch.arange(M, device=xf.device).repeat_interleave(k)[order]  # [M*k]
    send = torch.bincount(expert // per, minlength=ep.size)  # [ep]
    recv = ep.counts(send)
    send_l, recv_l = send.tolist(), recv.tolist()
    re = ep.exchange_ids(expert - (expert // per) * per, send_l, recv_l)  # [R] local expert of each row
    gathered = ep.gathered(re.shape[0], re.device)  # folded at etp > 1: the etp group's received rows [etp]
    if gathered is not None:
        re = ep.gather_ids(re, gathered)  # [sum(gathered)] the etp group's rows, in etp-rank order
    out = ep_experts(module, xf, w.flatten()[order], tok, send_l, recv_l, lambda e: torch.where(re == e)[0], ep,
                     gathered)
    return ep.whole(out) if fold else out  # folded: parts gathered


def with_shared(module: MoE, xf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, d] plus the shared expert of the tokens xf [M, d] (dense, gated by sigmoid(shared_gate(x)) when
    it has a gate), as `MoE.forward` adds it; out itself without a shared expert."""
    if module.shared is None:
        return out
    shared = module.shared(xf)  # [M, d]
    if module.shared_gate is not None:
        shared = torch.sigmoid(module.shared_gate(xf)) * shared  # [M, 1] * [M, d]
    return out + shared


def _local_expert(cfg: MoEConfig, xe: torch.Tensor, gate_w: torch.Tensor | None, up_w: torch.Tensor,
                  down_w: torch.Tensor, gate_b: torch.Tensor | None = None, up_b: torch.Tensor | None = None,
                  down_b: torch.Tensor | None = None, add_down_bias=None) -> torch.Tensor:
    """One local expert on its rows xe [m, d] -> [m, d], with its biases (expert_bias: gate_b, up_b [F(/t)],
    down_b [d or d/t], the latter added by `add_down_bias`, Experts.add_down_bias) as `Experts.one` adds them;
    its gate and input are released on return."""
    gate = xe @ gate_w.t() if gate_w is not None else None  # [m, F]
    up = xe @ up_w.t()  # [m, F]
    if up_b is not None:
        up = up + up_b
        gate = gate + gate_b if gate is not None else None
    act = expert_activation(cfg, gate, up)  # [m, F]
    del up  # released before the down projection, as the one-expression form did (the memory model's moment)
    out = act @ down_w.t()  # [m, d]
    return out if down_b is None else add_down_bias(out, down_b)


def ep_experts(module: MoE, xf: torch.Tensor, slot_w: torch.Tensor, tok: torch.Tensor, send: list[int],
               recv: list[int], rows_of, ep, gathered: list[int] | None = None) -> torch.Tensor:
    """The exchanges and expert maths of `ep_forward`, given its plan: xf [M, d], the routing weight [M*k] and
    the token [M*k] of each assignment in send order, the rows sent to and received from each rank, and
    rows_of(e): the received rows [m] of local expert e (folded at etp > 1: of the rows gathered over the etp
    group, `gathered` holding how many each etp rank received). -> [M, d].

    What is live at once (the memory model's expert-parallel moment, ltmdsl/kinds/moe.py `workspace`): the
    rows received and their results (two [M*k, d] buffers, the results added in place) beside one expert's
    input, its MLP and output; then the results sent back and, weighted, added in place into the output.

    Carved out of dp under tensor parallelism (Megatron's expert tensor parallelism) every tp rank routes the
    same tokens, holds F/t of its experts' width and returns its part of their outputs: the weighted sum is
    summed over the tp ranks, and the gradients of the inputs and routing weights, partial on each, are summed
    back, as `MoE.forward` does. Folded at etp > 1 (`gathered`) the etp ranks hold different rows: the received
    rows are all-gathered over the etp group and the experts' partial outputs reduce-scattered back instead."""
    cfg = module.cfg
    tp_mesh = module.experts.tp_mesh if gathered is None else None
    if tp_mesh is not None:  # the experts' inputs and weights get partial gradients from each tp rank
        xf, slot_w = copy_to_tp(xf, tp_mesh.get_group()), copy_to_tp(slot_w, tp_mesh.get_group())
    rows = xf[tok] * slot_w[:, None].to(xf.dtype) if cfg.weight_input else xf[tok]  # [M*k, d] (Llama-4: weighted in)
    rx = ep.exchange(rows, send, recv)  # [R, d] rows for this rank's experts
    del rows
    if gathered is not None:
        rx = ep.gather_rows(rx, gathered)  # [sum(gathered), d] the etp group's rows
    ry = module.experts(cfg, rx, rows_of, ep)  # [R, d] (folded at etp > 1: this rank's F/etp part of each)
    del rx  # the received rows are read by the experts only (autograd keeps what it needs)
    if gathered is not None:
        ry = ep.scatter_rows(ry, gathered)  # [R, d] this rank's rows, summed over the etp group
    back = ep.exchange(ry, recv, send)  # [M*k, d] in send order
    del ry
    out = torch.zeros_like(xf)  # [M, d]
    if not cfg.weight_input:
        back = back * slot_w[:, None].to(back.dtype)  # [M*k, d] weighted out
    out.index_add_(0, tok, back.to(xf.dtype))  # [M*k, d] summed per token
    return out if tp_mesh is None else sum_over_tp(out, tp_mesh)  # [M, d]


def cp_forward(module, x: torch.Tensor, cp) -> torch.Tensor:
    """Token-local: each context-parallel rank runs its own tokens, nothing crosses ranks. (The class's
    forward, not the instance's: under cp the instance's forward is this function.)"""
    return type(module).forward(module, x)


def trace_loops(c, tokens: int, keys: int) -> int:
    """One pass of the expert loop per expert (ltmdsl.measure.cost counts these to refuse a step too long to
    trace)."""
    return c.experts


KIND = RuntimeKind(
    name="moe",
    module=MoE,
    build=build,
    new_cache=None,
    ops={},
    oracles={},
    state_names=state_names,
    outputs=outputs,
    trace_loops=trace_loops,
    cp_inference=cp_local,
    cp_forward=cp_forward,
    ep_forward=ep_forward,
    tp_plan=tp_plan,
)
