"""What a layer kind is: the `Kind` record of facets every back end dispatches through, and its parts.

A kind (attention, mamba, ...) lives in one module of this package that defines its frozen IR config and
one `Kind` holding every pure facet (no torch): its typed parameters and how to build and check its
config, its exact parameter count, and what the memory and compute models need (cache and state bytes,
prefill workspace, stored training activations, FLOPs, how it splits under tp/ep) and what `show` prints.
Every facet is a required field: a kind cannot be registered with one missing, and a config whose kind is
not registered is refused by `ltmdsl.kinds.kind_of` rather than counted as zero. A facet that does not
apply says so with an empty value (an MLP has no cache: `cache` returns ()).

Facet signatures (c is the kind's config, d the model width d_model):

    build(values, ModelContext) -> c          raises CheckError (with the parameter to point at)
    count(c, d) -> int                        parameters of the mixer, its norm excluded
    inactive(c, d) -> int                     parameters a token does not touch (MoE: unrouted experts)
    split(c, d) -> Split                      what tp / ep divide, the expert-parallel and tp-replicated parameters
    context_check(c, context) -> str | None   why a budget's context does not suit this layer
    cache(c, Settings) -> tuple[CacheTerm]    per-sequence cache / state bytes on one GPU, symbolic in T, B
    workspace(c, d, Settings) -> expr         inference prefill workspace of one sub-layer, in T, B, C
    stored(c, MicroBatch, selective) -> expr  training activations kept for backward, per micro-batch
    backward(c, MicroBatch) -> expr           what the sub-layer's backward holds at its peak beyond `stored`
                                              and its output's gradient: its recomputed regions, one chunk's
                                              scan graph, its inputs' gradients, a weight's gradient in w
    flops(c) -> dict[str, Flops]              per-token and prefill FLOPs by component, beyond projections
    dims(c) -> str                            the key dimensions `show` prints
    per_use(c, d) -> int                      of `count`, the parameters each use of a shared block owns
                                              (per-use adapters); none_per_use for the others

A sub-layer in a `shared block` shares `count - per_use` parameters with the other uses of its slot and owns
`per_use` of its own (ltmdsl.ir.SubLayer.use_params).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy

from ltmdsl.ir import Dtype, LayerConfig, NormConfig

#: Activations of dense and expert MLPs; swiglu, geglu and geglu_tanh are gated (gate, up, down).
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "gelu", "relu2", "relu")
GATED = ("swiglu", "geglu", "geglu_tanh", "swiglu_clamped")  # the last: MoE experts only (gpt-oss)
#: The memory components a layer's cache and state belong to (the runtime's per-layer `component`).
CACHE_COMPONENTS = ("kv_cache", "recurrent_state")


@dataclass(frozen=True)
class Param:
    """One typed parameter of a layer kind.

    type: "int" | "float" | "bool" | "enum" | "norm" | "rope_scaling" (a `llama3(...)` call) | "layer" (the
    name of another layer definition, resolved to its config: a parallel layer's branches); `nullable`
    admits `none`. `default` is the value used when the spec does not give one; `required` ones have none.
    """

    name: str
    type: str
    default: Any = None
    required: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    min: float | None = None
    doc: str = ""


#: The parameter every kind accepts in addition to its own: the sub-layer's pre-norm.
NORM_PARAM = Param("norm", "norm", doc="pre-norm of this sub-layer (default: the model's norm)")
#: ... and its post-norm, applied to the sub-layer's output before the residual add (Gemma-3's sandwich norms).
POST_NORM_PARAM = Param("post_norm", "norm", nullable=True, doc="post-norm of this sub-layer's output (default: none)")
#: ... and its residual connection (ltmdsl.ir.Residual): what the skip path carries and the two scales.
RESIDUAL_PARAMS = (
    Param("skip", "enum", "input", choices=("input", "normed"),
          doc="what the residual carries: the sub-layer's input, or its pre-norm's output (MiniMax-01)"),
    Param("skip_scale", "float", 1.0, min=0, doc="factor on the residual (MiniMax-01's alpha factors)"),
    Param("branch_scale", "float", 1.0, min=0, doc="factor on the branch output (MiniMax-01's beta factors)"),
    Param("input", "enum", "stream", choices=("stream", "concat_embed"),
          doc="what the pre-norm and the mixer read: the stream x, or cat[x, embeddings] (Zamba's shared block)"),
    Param("into", "enum", "residual", choices=("residual", "next_input"),
          doc="where the branch goes: the residual stream, or only the next sub-layer's input (Zamba)"),
)


@dataclass(frozen=True)
class ModelContext:
    """What a layer's defaults may depend on: the model width, its default norm and the width the mixer reads
    (`d_in`: 2 * d_model under `input = concat_embed`, else d_model; only kinds whose config has a `d_in` field
    take a wider input)."""

    d_model: int
    norm: NormConfig
    d_in: int | None = None

    @property
    def width_in(self) -> int:
        return self.d_model if self.d_in is None else self.d_in


class CheckError(Exception):
    """A semantic problem with one layer definition; `param` names the parameter to point at."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class KindError(LookupError):
    """A config whose kind is not registered (or is registered for another config class)."""


@dataclass(frozen=True)
class CacheTerm:
    """One tensor a sub-layer keeps between decode steps, in bytes on one GPU.

    component: the memory model's component ("kv_cache" or "recurrent_state"); part: the by-kind label
    suffix (None: the kind name alone, e.g. "attention"; "conv": "mamba/conv"); dtype: the storage dtype
    (the budget's kv or state dtype); bytes: a sympy expression in T and B (and dp).
    """

    component: str
    part: str | None
    dtype: Dtype
    bytes: sympy.Expr

    def __post_init__(self) -> None:
        if self.component not in CACHE_COMPONENTS:  # any other name would fall outside every memory total
            raise ValueError(f"cache term component must be one of {', '.join(CACHE_COMPONENTS)}, "
                             f"not {self.component!r}")


@dataclass(frozen=True)
class Flops:
    """FLOPs of one component: per decoded token at context T, and to prefill T tokens (sympy in T)."""

    per_token: sympy.Expr
    prefill: sympy.Expr


@dataclass(frozen=True)
class Split:
    """How a sub-layer splits under parallelism.

    tp: (what, count) pairs tensor parallelism must divide (attention heads); ep: the same for expert
    parallelism (experts); etp: the same for expert tensor parallelism (the routed experts' width, which etp
    splits: tp unless the plan folds the experts otherwise); expert_params: parameters sharded over etp * ep
    rather than tp (the routed experts);
    replicated: parameters of the mixer (its norms excluded, as in `count`) that every tp rank holds whole,
    as the kind's tensor-parallel plan keeps them (a row-parallel output bias, MLA's latent projections, the
    MoE router, a norm weight shared by heads on different ranks). The rest, count - expert_params -
    replicated, is split over tp (/ t); activations split as real numbers (d_inner / t).

    grouped: (what, n, params) for parameters split by n groups that tp splits while it divides n and
    replicates beyond (attention's K/V projections by KV heads: at t > n each rank holds the one group its
    other heads use, params / n, as Megatron-LM replicates KV heads); t must divide n or be a multiple of it.
    They are part of the split rest, per rank params / min(t, n). use_grouped: the part of `grouped` that is
    per use (`per_use`: a shared block's adapters onto K and V), which every tied use holds again.
    """

    tp: tuple[tuple[str, int], ...] = ()
    ep: tuple[tuple[str, int], ...] = ()
    etp: tuple[tuple[str, int], ...] = ()
    expert_params: int = 0
    replicated: int = 0
    grouped: tuple[tuple[str, int, int], ...] = ()
    use_grouped: tuple[tuple[str, int, int], ...] = ()


FACETS = ("build", "count", "inactive", "split", "context_check", "cache", "workspace", "stored", "backward", "flops",
          "dims", "per_use")


def none_per_use(c: Any, d_model: int) -> int:
    """The per_use facet of a kind whose parameters all tie together in a shared block (every kind but one
    with per-use adapters)."""
    return 0


@dataclass(frozen=True)
class Kind:
    """A registered layer kind: its name, config class, parameters and every pure facet (module docstring).

    All fields are required, so a kind cannot be half-registered; `__post_init__` also refuses a facet
    that is not callable (None, say) and a config class that does not declare this kind's name.
    """

    name: str
    doc: str
    config: type
    params: tuple[Param, ...]
    is_ffn: bool
    build: Callable[[dict[str, Any], ModelContext], Any]
    count: Callable[[Any, int], int]
    inactive: Callable[[Any, int], int]
    split: Callable[[Any, int], Split]
    context_check: Callable[[Any, int], "str | None"]
    cache: Callable[[Any, Any], tuple[CacheTerm, ...]]
    workspace: Callable[[Any, int, Any], sympy.Expr]
    stored: Callable[[Any, Any, bool], sympy.Expr]
    backward: Callable[[Any, Any], sympy.Expr]
    flops: Callable[[Any], dict[str, Flops]]
    dims: Callable[[Any], str]
    per_use: Callable[[Any, int], int]
    param_index: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [f for f in FACETS if not callable(getattr(self, f))]
        if missing:
            raise TypeError(f"layer kind '{self.name}' lacks the facet{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}")
        if not (isinstance(self.config, type) and issubclass(self.config, LayerConfig)):
            raise TypeError(f"layer kind '{self.name}': config must be a LayerConfig dataclass")
        declared = {f.name: f.default for f in dataclasses.fields(self.config)}.get("kind")
        if declared != self.name:
            raise TypeError(f"layer kind '{self.name}': {self.config.__name__}.kind is {declared!r}")
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})


# ---- helpers several kinds share ----------------------------------------------------------------


def divide(a: int, b: int, what: str, param: str) -> int:
    """a / b when b divides a; a CheckError pointing at `param` otherwise."""
    if b <= 0 or a % b:
        raise CheckError(f"{what}: {a} is not divisible by {b}", param)
    return a // b


def ffn_width(activation: str, d_ff: int) -> int:
    """Elements per token an MLP keeps: gate, up and product when gated; up and activation otherwise."""
    return (3 if activation in GATED else 2) * d_ff


def inference_ffn_width(activation: str, d_ff: int) -> int:
    """Elements per token an MLP holds at once without autograd: 2F (act(gate) computed in place, then up; or
    up and gelu(up)), F for relu and relu2 (in place on up), as the runtime's inference path computes it."""
    return d_ff if activation in ("relu", "relu2") else 2 * d_ff


def saved_ffn_width(activation: str, d_ff: int, eager: bool) -> int:
    """Elements per token an FFN keeps for backward. Fused (Korthikanti et al.): `ffn_width`. Eager PyTorch
    autograd: gated keeps gate, up, act(gate) and the product (4F); relu keeps its output once, shared by the
    down projection (F); gelu keeps up and gelu(up), relu2 relu(up) and its square (2F)."""
    if not eager:
        return ffn_width(activation, d_ff)
    if activation in GATED:
        return 4 * d_ff
    return d_ff if activation == "relu" else 2 * d_ff


def conv_taps(d_conv: int, convention: str) -> int:
    """Conv taps kept per channel: K ("full", state-spaces/mamba and Megatron) or K - 1 ("minus_one", vLLM)."""
    return d_conv if convention == "full" else d_conv - 1


def no_cache(c: Any, s: Any) -> tuple[CacheTerm, ...]:
    """The cache facet of a kind that keeps nothing between decode steps (feed-forward networks)."""
    return ()


def no_context_limit(c: Any, context: int) -> str | None:
    """The context_check facet of a kind that suits every context."""
    return None


def none_inactive(c: Any, d_model: int) -> int:
    """The inactive facet of a dense kind: every parameter is touched by every token."""
    return 0
