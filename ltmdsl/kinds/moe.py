"""Sparse mixture of experts: a linear router over E experts, top-k per token, optional shared experts.

What a token computes (M tokens, router logits l = x W_r^T (+ b_r) [M, E]):
    scores     s = softmax(l) or sigmoid(l)                    (routing *_topk*: softmax; sigmoid_*: sigmoid)
    selection  c = s (+ selection_bias, DeepSeek-V3's `e_score_correction_bias`: used to choose, never to weigh);
               with `groups` G > 1 (DeepSeek's n_group) the experts form G groups of E/G, each group scored
               by the sum of its two best c (`group_score = top2_sum`, DeepSeek-V3) or its best c (`max`,
               DeepSeek-V2), and only the `top_groups` best groups (topk_group) stay eligible
    weights    w = s at the k chosen experts, divided by their sum when the routing renormalises
               (`*_renorm`), times `routed_scale` (DeepSeek's routed_scaling_factor);
               topk_softmax (gpt-oss, Granite) is a softmax over the k chosen logits instead
    output     sum_j w_j * expert_j(x)   or, with `weight_input` (Llama-4),  sum_j expert_j(w_j * x)
               + shared(x), times sigmoid(x . g) with `shared_gate` (Qwen2-MoE / Qwen3-Next)
Experts are MLPs with the model's activations or gpt-oss's clamped SwiGLU
    swiglu_clamped: g = min(gate, limit); u = clamp(up, -limit, limit); h = g * sigmoid(alpha * g) * (u + 1)
and optional biases (`expert_bias`, gpt-oss: gate and up [F], down [d] per expert). The shared expert is
one dense MLP of width `shared_d_ff` (DeepSeek's moe_intermediate_size * n_shared_experts), no biases.

Parameters (exactly as `transformers` counts them; the selection bias is a buffer there, not a parameter,
so it is stored but not counted):
    router d*E (+ E router bias) + E * expert + shared (3|2)*d*Fs (+ d for the shared gate)
    expert = (3|2)*d*F (+ 2F + d | F + d with expert_bias)
A token touches the router, the shared expert and k experts: the other E - k experts are `inactive`.
Expert parallelism shards the routed experts (ep must divide E) and expert tensor parallelism their width
(etp must divide F; etp = t unless the plan folds the experts otherwise, Megatron-Core's MoE parallel
folding); the router and the shared expert are dense.
It keeps nothing between decode steps (no cache), and its FLOPs are projections only.
Prefill workspace for a chunk of Cc = min(C, T) tokens (n = b * Cc/c tokens; with the experts apart, ep > 1 or
folded, n in the experts' moments below means the rows a slot at this rank's experts, n*etp/t folded (each tp
rank dispatching its n/t part, the received rows gathered over the etp group), n carved out of dp, plus the
dispatched part's fp32 weights beside w (folded under tp: and the part cut from w); routing, the output
a * n * d and the shared expert stay whole; F/t below is F/etp for the routed experts), as the runtime holds
it: the
largest of three moments, each with the fp32 routing weights w = 4 * n * k live,
    routing     a * n * E logits + 4 * n * E * (2 if the selection scores differ else 1) fp32 scores + 2w
    experts     the output a * n * d + w, and one expert at a time on its m = ceil(n * k / E) tokens (balanced):
                a * m * (3d + F*(4|2)/t)   (its input, output and weighted output; gate, up, act, product)
    shared      a * n * d + a * n * max(`inference_ffn_width`(Fs)/t, 2d)   (the routed output beside the shared
                MLP in place; the routed part, a function of its own, has released w, its indices and its last
                expert's rows: its loop's variables had held that expert's [m, d] output, +6.7% at d_model 512)
    With the experts apart (ep > 1 or folded, runtime `ep_experts`) the experts' moment is the rows received and their
    results (added in place) 2a * n*k * d, w and the weights in send order 2w, and the larger of one local
    expert on the ep*m rows it gets from every rank, a * ep*m * (d + max(F*(4|2)/t, d + F*(2|1)/t)) (its input;
    gate, up, act(gate) and the product, or at its down projection the gate and the product (the act's input)
    and its output), and the combine, where the results sent back, weighted, are added into the output a * n * d;
    folded at etp > 1 also the gather, the received rows, a padded copy and the etp ranks' rows before their
    concatenation, 2a * (n/etp)*k * d beyond the two buffers.
    (The experts' zero result tied to their weights is made in place: `rx * 0 + held * 0` had held a third
    [n*k, d] buffer, +27% on Qwen1.5-MoE's serve_32k.)
Training activations (dropless top-k, perfectly balanced routing so expert parallelism moves tokens but
not bytes), per micro-batch:
    replicated  norm input and router input 2a*sbh; router logits and probabilities fp32 8*sb*E;
                k dispatched copies of the input and k expert outputs 2k*a*sbh; with weight_input the
                k weighted copies k*a*sbh; with shared_gate the shared output and the gate a*sb*(h + 1)
    split       each of the k expert MLPs as a dense MLP: k * (3|2) * a*sb*F; the shared MLP (3|2) * a*sb*Fs
    saved_by = "eager" (ltmdsl's runtime under autograd): the expert MLPs keep act(gate) too (4F gated), and
                the scatter-add of the router-weighted expert outputs keeps its source, k*a*sbh more
    experts apart (ep > 1, or folded: runtime `ep_routed`, `ep_experts`): a rank dispatches n of its tok = sb
                tokens, n = tok/t folded (each tp rank its part; all of them carved out of dp), and its experts
                compute r = etp*n rows a slot folded (the received rows all-gathered over the etp group; r = n
                carved out of dp): each expert's input and its output (the in-place add's source) 2k*a*r*h,
                the rows sent back (the weight's product) k*a*n*h and eager their weighted copy k*a*n*h (with
                weight_input the unweighted copies k*a*n*h), the int64 tokens and send order and the weights
                in send order k*n*(16 + a), each local expert's int64 row ids 8k*r (replicated). The expert
                MLPs, F/etp wide on k*r rows, are k*tok*F/t as above.
    (Approximate: the runtime's router keeps its fp32 scores 4*sb*E, its int64 indices and fp32 weights
    12*sb*k and, renormalising, their sum 4*sb, on every tp rank; 8*sb*E stands for them: -2.1% activations
    on a tp 4 rank at d_model 64, E 4, k 2.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    ACTIVATIONS, GATED, CheckError, Flops, Kind, ModelContext, Param, Split, inference_ffn_width, no_cache,
    no_context_limit, saved_ffn_width, none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational
ROUTINGS = ("softmax_topk_renorm", "softmax_topk", "topk_softmax", "sigmoid_topk_renorm", "sigmoid_topk")
#: The experts' activations: the MLP's, plus gpt-oss's clamped SwiGLU (gated: gate, up and down).
EXPERT_ACTIVATIONS = (*ACTIVATIONS, "swiglu_clamped")
GROUP_SCORES = ("top2_sum", "max")
#: gpt-oss's clamped SwiGLU constants (transformers' GptOssConfig swiglu_limit, GptOssExperts alpha).
SWIGLU_LIMIT, SWIGLU_ALPHA = 7.0, 1.702


@dataclass(frozen=True)
class MoEConfig(LayerConfig):
    """Sparse mixture of experts: a linear router over E experts, top-k per token (module docstring).

    routing "softmax_topk_renorm" (Mixtral, Qwen3): softmax over all experts, keep top-k, renormalise.
    routing "softmax_topk" (Jamba, DeepSeek-V2): softmax over all experts, keep top-k, no renormalisation.
    routing "topk_softmax" (gpt-oss, Granite): softmax over the top-k logits (equals Mixtral's).
    routing "sigmoid_topk_renorm" (DeepSeek-V3, Kimi, Nemotron-3): sigmoid scores, keep top-k, renormalise.
    routing "sigmoid_topk" (Llama-4): sigmoid scores, keep top-k as they are.
    Defaults of the fields after `kind` leave a plain Mixtral-style MoE.
    """

    experts: int  # E
    top_k: int  # k
    d_ff: int
    activation: str
    routing: str
    kind: str = field(default="moe", init=False)
    groups: int = 1  # G, DeepSeek's n_group
    top_groups: int = 1  # groups kept per token (topk_group); == groups when not grouped
    group_score: str = "top2_sum"  # "top2_sum" | "max"; meaningful only when groups > 1
    selection_bias: bool = False  # a per-expert bias [E] added to the scores for selection only
    routed_scale: float = 1.0  # routed_scaling_factor
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float = SWIGLU_LIMIT  # swiglu_clamped only
    swiglu_alpha: float = SWIGLU_ALPHA  # swiglu_clamped only
    shared_d_ff: int = 0  # Fs, 0: no shared expert
    shared_gate: bool = False  # sigmoid(x . g) scales the shared expert's output
    weight_input: bool = False  # the routing weight scales each expert's input (Llama-4), not its output

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def renormalise(self) -> bool:
        return self.routing.endswith("_renorm")

    @property
    def score(self) -> str:
        """The function of the logits the weights come from: softmax, sigmoid or (topk_softmax) none."""
        return "logits" if self.routing == "topk_softmax" else self.routing.split("_")[0]

    def variants(self) -> tuple[str, ...]:
        """The settings beyond a plain Mixtral/Jamba-style MoE that this config uses (fields off their
        defaults), so a mapping that knows only plain MoEs can refuse the others by name."""
        plain = MoEConfig(self.experts, self.top_k, self.d_ff, self.activation, self.routing)
        return tuple(f.name for f in dataclasses.fields(self)
                     if f.name not in ("experts", "top_k", "d_ff", "activation", "routing", "kind")
                     and getattr(self, f.name) != getattr(plain, f.name)
                     and not (f.name.startswith("swiglu_") and self.activation != "swiglu_clamped"))

    def beyond_plain(self) -> tuple[str, ...]:
        """What a path that runs only plain MoEs must refuse: the variants, and a clamped SwiGLU by name."""
        return self.variants() + (("act = swiglu_clamped",) if self.activation == "swiglu_clamped" else ())

    def expert_params(self, d_model: int) -> int:
        """Parameters of one routed expert: gate, up and down for gated activations, and their biases."""
        bias = ((2 * self.d_ff if self.gated else self.d_ff) + d_model) if self.expert_bias else 0
        return (3 if self.gated else 2) * d_model * self.d_ff + bias

    def shared_params(self, d_model: int) -> int:
        """Parameters of the shared expert and its gate (0 without one)."""
        return (3 if self.gated else 2) * d_model * self.shared_d_ff + (d_model if self.shared_gate else 0)

    def inactive_params(self, d_model: int) -> int:
        """Parameters a token does not touch: the routed experts it is not routed to."""
        return (self.experts - self.top_k) * self.expert_params(d_model)


def build(v: dict[str, Any], ctx: ModelContext) -> MoEConfig:
    E, k, routing = v["experts"], v["top_k"], v["routing"]
    if k > E:
        raise CheckError(f"top_k ({k}) exceeds experts ({E})", "top_k")
    G = v["groups"]
    if G > 1:
        if routing == "topk_softmax":
            raise CheckError("grouped selection needs scores; topk_softmax has none (softmax_topk_renorm routes "
                             "identically)", "groups")
        if E % G:
            raise CheckError(f"experts ({E}) must be a multiple of groups ({G})", "groups")
    top_groups = v["top_groups"] if v["top_groups"] is not None else G
    if v["top_groups"] is not None and G == 1:
        raise CheckError("top_groups needs groups > 1", "top_groups")
    if top_groups > G:
        raise CheckError(f"top_groups ({top_groups}) exceeds groups ({G})", "top_groups")
    if v["group_score"] is not None and G == 1:
        raise CheckError("group_score needs groups > 1", "group_score")
    group_score = v["group_score"] or "top2_sum"
    if G > 1 and group_score == "top2_sum" and E // G < 2:
        raise CheckError(f"group_score top2_sum needs at least 2 experts per group, got {E // G}",
                         "group_score" if v["group_score"] else "groups")
    if k > top_groups * (E // G):
        raise CheckError(f"top_k ({k}) exceeds the {top_groups * (E // G)} experts of the top_groups "
                         f"({top_groups} of {G} groups of {E // G})", "top_k")
    if v["selection_bias"] and routing == "topk_softmax":
        raise CheckError("selection_bias needs scores; topk_softmax has none (softmax_topk_renorm routes "
                         "identically)", "selection_bias")
    act = v["act"]
    limit, alpha = v["swiglu_limit"], v["swiglu_alpha"]
    if act != "swiglu_clamped":
        for name in ("swiglu_limit", "swiglu_alpha"):
            if v[name] is not None:
                raise CheckError(f"{name} applies to act = swiglu_clamped only (act is {act})", name)
    if v["shared_gate"] and v["shared_d_ff"] == 0:
        raise CheckError("shared_gate needs a shared expert (shared_d_ff > 0)", "shared_gate")
    if v["shared_d_ff"] and act == "swiglu_clamped":
        raise CheckError("a shared expert uses the MLP activations; swiglu_clamped is for routed experts only",
                         "shared_d_ff")
    return MoEConfig(
        experts=E, top_k=k, d_ff=v["d_ff"], activation=act, routing=routing, groups=G, top_groups=top_groups,
        group_score=group_score, selection_bias=v["selection_bias"], routed_scale=float(v["routed_scale"]),
        router_bias=v["router_bias"], expert_bias=v["expert_bias"],
        swiglu_limit=SWIGLU_LIMIT if limit is None else float(limit),
        swiglu_alpha=SWIGLU_ALPHA if alpha is None else float(alpha),
        shared_d_ff=v["shared_d_ff"], shared_gate=v["shared_gate"], weight_input=v["weight_input"],
    )


def count(c: MoEConfig, d: int) -> int:
    router = d * c.experts + (c.experts if c.router_bias else 0)
    return router + c.experts * c.expert_params(d) + c.shared_params(d)


def inactive(c: MoEConfig, d: int) -> int:
    return c.inactive_params(d)


def split(c: MoEConfig, d: int) -> Split:
    """Expert parallelism shards the routed experts (ep must divide E) and expert tensor parallelism their
    width (etp must divide d_ff); the router and shared expert are dense. Under tp the router and the shared
    gate are replicated (same input, same gradient on every rank)."""
    router = d * c.experts + (c.experts if c.router_bias else 0)
    return Split(ep=(("experts", c.experts),), etp=(("expert width d_ff", c.d_ff),),
                 expert_params=c.experts * c.expert_params(d),
                 replicated=router + (d if c.shared_gate else 0))


def _second_scores(c: MoEConfig) -> bool:
    """Whether selection works on scores other than the weights' (a bias or a group mask)."""
    return c.selection_bias or c.groups > 1


def workspace(c: MoEConfig, d: int, s):
    out_tok = per_replica(B, s.dp) * Smallest(C, T) / R(s.cp)  # b * Cc / c tokens
    apart = _dispatch(s.parallel, out_tok)  # experts apart (ep > 1 or folded): (tokens dispatched, rows a slot)
    n = out_tok if apart is None else apart[1]  # the rows a slot at this rank's experts
    a, t = s.activation_dtype.bytes, R(s.tp)
    m = sympy.ceiling(n * c.top_k / c.experts)  # tokens per expert under balanced routing
    weights = 4 * out_tok * c.top_k  # the fp32 routing weights of every token, live to the end
    route = a * out_tok * c.experts + 4 * out_tok * c.experts * (2 if _second_scores(c) else 1) + 2 * weights
    expert = (4 if c.activation in GATED else 2) * c.d_ff / R(s.etp)  # gate, up, act(gate), product | up, act(up)
    loop = a * out_tok * d + weights + a * m * (3 * d + expert)  # the output, and one expert's tokens at a time
    if apart is not None:  # experts apart (runtime `ep_experts`): the rows at the experts and their results,
        # [n*k, d] each (folded at etp > 1: gathered over the etp group), beside one local expert on its ep*m
        # rows, then the results sent back and weighted beside the output; the dispatched assignments' fp32
        # weights in send order beside w (folded under tp: and the part cut from w)
        rows = 2 * a * n * c.top_k * d
        sent = 4 * apart[0] * c.top_k * (2 if apart[2] else 1)
        one = d + Largest(expert, d + expert / 2)  # its input; the MLP, or the down projection's input and
        moments = [s.ep * m * one, out_tok * d]  # output beside gate (gated); the combine's output
        if apart[3]:  # gathered over the etp group (runtime `_all_gather_rows`): beside the rows received,
            # a padded copy of them, the etp ranks' padded rows and their concatenation: 2 + 2*etp times the
            # received [n*k, d] where the experts' moment holds 2*etp (+75% at tp 1 x ep 1 x etp 2 uncounted)
            moments.append(2 * apart[0] * c.top_k * d)
        loop = weights + sent + rows + a * Largest(*moments)
    out = Largest(route, loop)
    if c.shared_d_ff:  # dense, on every token of the rank (width split over tp): the routed output beside the
        # shared MLP; the routing weights were released with the routed part (runtime `MoE.routed`, `ep_routed`)
        out = Largest(out, a * out_tok * d + a * out_tok * Largest(
            inference_ffn_width(c.activation, c.shared_d_ff) / t, 2 * d))
    return out


def _dispatch(plan, tokens):
    """How the runtime (`ep_routed`) dispatches a rank's `tokens` when the experts run apart from the dense layers
    (ep > 1, or folded: Megatron-Core's MoE parallel folding, an etp other than tp or an ep not dividing dp):
    (n, r), the tokens this rank dispatches and the rows its experts compute per slot. Folded, each tp rank
    dispatches its 1/t part (n = tokens/t) and at etp > 1 the rows received are all-gathered over the etp group
    (r = etp*n); carved out of dp every tp rank dispatches every token (n = r = tokens). Also whether n is a part
    of the tokens (cut, folded at tp > 1) and whether r is gathered (folded at etp > 1), read off the plan's
    integers: the expressions themselves may be built unevaluated, so comparing them says nothing. None: not
    apart."""
    folded = plan.expert_tp != plan.tp or plan.dp % plan.ep != 0
    if plan.ep == 1 and not folded:
        return None
    n = tokens / R(plan.tp) if folded else tokens
    return n, (n * plan.expert_tp if folded else n), folded and plan.tp > 1, folded and plan.expert_tp > 1


def stored(c: MoEConfig, x, selective: bool):
    a, tok = x.a, x.tok
    copies = 3 if x.eager else 2  # dispatched inputs, expert outputs (and eager: the weighted outputs)
    router = 8 * tok * c.experts  # every token's logits and scores, on every tp rank
    apart = _dispatch(x.plan, tok)
    if apart is None:
        rep = copies * c.top_k * a * tok * x.h
        if c.weight_input:
            rep += c.top_k * a * tok * x.h
    else:  # `ep_experts`: n*k assignments sent, r*k rows at the experts (module docstring)
        n, r = apart[:2]
        k = c.top_k
        rep = (2 * r * k * a * x.h  # each expert's input and its output (the in-place add's source)
               + (copies - 1) * n * k * a * x.h  # the rows sent back (the weight's product), eager: weighted
               + n * k * (16 + a)  # the int64 tokens and send order, and the weights in send order
               + 8 * r * k)  # each local expert's int64 row ids
        if c.weight_input:
            rep += k * a * n * x.h
    rep += router
    if c.shared_gate:
        rep += a * tok * (x.h + 1)
    split_ = (c.top_k * a * tok * saved_ffn_width(c.activation, c.d_ff, x.eager)
              + a * tok * saved_ffn_width(c.activation, c.shared_d_ff, x.eager))
    return x.base + x.within(rep) + x.split(split_)


def flops(c: MoEConfig) -> dict[str, Flops]:
    """Nothing beyond its projections (router, shared expert and the k routed experts: active parameters)."""
    return {}


def dims(c: MoEConfig) -> str:
    parts = [f"E={c.experts} k={c.top_k} d_ff={c.d_ff} {c.activation} {c.routing}"]
    if c.groups > 1:
        parts.append(f"groups={c.top_groups}/{c.groups} {c.group_score}")
    if c.selection_bias:
        parts.append("selection_bias")
    if c.routed_scale != 1.0:
        parts.append(f"scale={c.routed_scale:g}")
    if c.router_bias or c.expert_bias:
        parts.append("bias=" + "+".join(n for n, on in (("router", c.router_bias), ("experts", c.expert_bias)) if on))
    if c.activation == "swiglu_clamped":
        parts.append(f"limit={c.swiglu_limit:g} alpha={c.swiglu_alpha:g}")
    if c.shared_d_ff:
        parts.append(f"shared={c.shared_d_ff}" + (" gated" if c.shared_gate else ""))
    if c.weight_input:
        parts.append("weight_input")
    return " ".join(parts)


def backward(c: MoEConfig, x):
    """The backward's peak beyond `stored` and the output's gradient: the experts' stacked weight gradients in
    w, gate_up [E, 2F, d] (or up [E, F, d]) and down [E, d, F] on this rank's E/ep experts, formed before the
    hooks add them into the fp32 main gradient (F/etp wide), beside the gradient of the experts' hidden rows,
    a*tok*k*F/t."""
    per_expert = (3 if c.gated else 2) * c.d_ff * x.h
    return x.w * R(c.experts, x.ep) * per_expert / x.etp + x.split(x.a * x.tok * c.top_k * c.d_ff)


KIND = Kind(
    name="moe",
    doc="Sparse mixture of experts with a linear top-k router and optional shared experts.",
    config=MoEConfig,
    params=(
        Param("experts", "int", required=True, min=1, doc="E"),
        Param("top_k", "int", 2, min=1, doc="experts per token k"),
        Param("d_ff", "int", required=True, min=1, doc="hidden width of each expert"),
        Param("act", "enum", "swiglu", choices=EXPERT_ACTIVATIONS),
        Param("routing", "enum", "softmax_topk_renorm", choices=ROUTINGS,
              doc="softmax_topk_renorm (Mixtral), softmax_topk (Jamba), topk_softmax, sigmoid_topk_renorm "
                  "(DeepSeek-V3), sigmoid_topk (Llama-4)"),
        Param("groups", "int", 1, min=1, doc="expert groups G for group-limited selection (n_group)"),
        Param("top_groups", "int", None, nullable=True, min=1, doc="groups kept per token (topk_group; default G)"),
        Param("group_score", "enum", None, nullable=True, choices=GROUP_SCORES,
              doc="how a group is scored: top2_sum (DeepSeek-V3, default) or max (DeepSeek-V2)"),
        Param("selection_bias", "bool", False, doc="per-expert bias added for selection only (noaux_tc)"),
        Param("routed_scale", "float", 1.0, min=1e-9, doc="factor on the routing weights"),
        Param("router_bias", "bool", False),
        Param("expert_bias", "bool", False, doc="biases on every expert projection (gpt-oss)"),
        Param("swiglu_limit", "float", None, nullable=True, min=1e-9, doc="swiglu_clamped clamp (default 7)"),
        Param("swiglu_alpha", "float", None, nullable=True, min=1e-9, doc="swiglu_clamped slope (default 1.702)"),
        Param("shared_d_ff", "int", 0, min=0, doc="width of the shared expert (0: none)"),
        Param("shared_gate", "bool", False, doc="sigmoid gate on the shared expert (Qwen)"),
        Param("weight_input", "bool", False, doc="routing weights scale the expert input (Llama-4)"),
    ),
    is_ffn=True,
    build=build,
    count=count,
    inactive=inactive,
    split=split,
    context_check=no_context_limit,
    cache=no_cache,
    workspace=workspace,
    stored=stored,
    backward=backward,
    flops=flops,
    dims=dims,
    per_use=none_per_use,
)
