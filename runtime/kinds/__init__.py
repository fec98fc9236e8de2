"""The runtime registry: kind name -> `RuntimeKind`, the torch side of each layer kind.

Keyed by the same names as the pure registry (ltmdsl.kinds.REGISTRY), in the same order. Each entry is
written once, in its kind's module (runtime/kinds/<kind>.py), and says everything the runtime needs:

    name         the kind name (`SubLayer.kind`)
    module       the nn.Module class (parallel `forward(x, state, pos0)` and one-token `step(x, state, pos0)`)
    build        (config, d_model, eps, kernels) -> module instance
    new_cache    (config, CacheRequest) -> its per-layer LayerCache; None declares "keeps no state"
    ops          the reference kernel ops its module calls through `kernels.<op>` ({op: callable})
    oracles      plain oracle variants of some of those ops (REFERENCE_KERNELS), {} when none
    state_names  (config) -> the parameter names (relative to the mixer) its module owns, exactly
    outputs      (config) -> {parameter name: normalised}: its output projections, the weights that write
                 into the residual stream, each with whether its input is normalised to unit RMS; the
                 model's init rescales them (runtime.initializers.residual_outputs_)
    trace_loops  (config, tokens, keys) -> int: iterations of the sequence loops its reference code runs over
                 `tokens` queries against `keys` keys (chunks, query blocks, experts; 0 for straight-line
                 code), which ltmdsl.measure.cost counts to refuse a step too long to trace
                 (`chunk_loops` and `no_loops` below serve the chunked kinds and the loop-free ones)
    cp_inference (config) -> its form under context-parallel inference (ltmdsl.distributed.cp_inference):
                 "sharded" (its cache is a position-sharded KVCache of `tokens_held` slots and its module offers
                 attention's `_qkv`, `_out`, `scale` and `cfg.window`), "passed" (its cache is a state, run one
                 rank after another and broadcast) or "local" (token-local, no cache); raises
                 ContextParallelInferenceUnsupported for a config it cannot serve. None: cp > 1 inference is
                 refused naming the kind. `cp_passed` and `cp_local` below serve the state kinds and the
                 token-local ones.
    placed       True when the module depends on its place in the stack (MiniMax's lightning attention
                 decays by depth): `build` then also takes `place=LayerPlace(...)`, which the model
                 derives from the IR's stack (`layer_places`). False for every position-free kind.
    tp_plan      (config, tp) -> {submodule name: torch ParallelStyle}, how tensor parallelism splits its
                 module (ltmdsl.distributed.tensor_parallel applies it); raises TensorParallelUnsupported
                 for a config it cannot split. None declares "no tensor-parallel plan": tp > 1 is refused
                 naming the kind. A kind with `ep_forward` also takes `expert_tp` (the plan's etp): other than
                 tp, its routed experts are left for expert parallelism to split over etp ranks.
    cp_forward   (module, x [p*B, c, d], cp) -> [p*B, c, d]: the module's forward on one context-parallel
                 rank's p chunks of the sequence (two under the load-balanced split), folded into the batch,
                 exchanging what crosses the cuts through `cp` (ltmdsl.distributed.context_parallel.
                 ContextShard). None: cp > 1 is refused naming the kind.
    ep_forward   (module, x, ep) -> out: the forward with the experts split over the ep ranks (ltmdsl.
                 distributed.expert_parallel); None for kinds without experts.
    new_use      (config, d_model) -> nn.Module: the parameters one use of the layer owns even when a shared
                 block ties the rest (per-use LoRA adapters, `Kind.per_use`); the model keeps one per
                 sub-layer (`uses.{i}.*`) and passes it as `use=` to the module's forward and step. None: the
                 kind has no per-use parameters (every kind but transformer_block).
    use_tp_plan  (config, tp) -> {submodule of a use: torch ParallelStyle}: how tensor parallelism splits
                 each use's parameters (applied to every `uses.{i}`); None for a kind without uses.

`LTModel`, `runtime.cache.allocate` and `runtime.kernels` only look entries up here; a kind with no entry
is refused at build with its name. Importing this package imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from torch import nn


@dataclass(frozen=True)
class LayerPlace:
    """Where a sub-layer sits in the stack, counted in sequence mixers (a transformers decoder layer):
    `depth` mixers come before it, of `depths` in the whole stack. A feed-forward sub-layer shares the
    depth of the mixer before it."""

    depth: int
    depths: int

    def __post_init__(self) -> None:
        if not 0 <= self.depth < max(self.depths, 1):
            raise ValueError(f"layer place {self.depth} outside a stack of {self.depths} mixers")


def layer_places(layers) -> list[LayerPlace]:
    """The place of each sub-layer of a ModelIR's stack (`ModelIR.layers`), from the stack alone."""
    mixers = sum(not layer.is_ffn for layer in layers)
    places, before = [], 0
    for layer in layers:
        if layer.is_ffn:
            places.append(LayerPlace(max(before - 1, 0), mixers))
        else:
            places.append(LayerPlace(before, mixers))
            before += 1
    return places


def chunk_loops(c, tokens: int, keys: int) -> int:
    """`trace_loops` of a kind whose chunked form runs `c.chunk` tokens at a time, one chunk after another."""
    return -(-tokens // c.chunk)


def no_loops(c, tokens: int, keys: int) -> int:
    """`trace_loops` of a kind without a sequence loop: straight-line code over the tokens."""
    return 0


#: the forms a kind can take under context-parallel inference (`RuntimeKind.cp_inference`)
CP_FORMS = ("sharded", "passed", "local")


def cp_passed(c) -> str:
    """`cp_inference` of a kind whose cache is a state: the state is passed from cp rank to cp rank."""
    return "passed"


def cp_local(c) -> str:
    """`cp_inference` of a token-local kind (no cache): each cp rank runs its own tokens."""
    return "local"


class NoRuntimeModule(LookupError):
    """A layer kind has no runtime entry: the model cannot be built or its cache allocated."""


class TensorParallelUnsupported(ValueError):
    """A kind (or one config of it) that tensor parallelism cannot split; the message names it and why."""


class ContextParallelInferenceUnsupported(ValueError):
    """A model (a kind, or one config of it) that context-parallel inference cannot serve; the message names
    the kind or the reason."""


@dataclass(frozen=True)
class RuntimeKind:
    """The torch facets of one layer kind (see the module docstring for each field)."""

    name: str
    module: type[nn.Module]
    build: Callable[..., nn.Module]
    new_cache: Callable | None
    ops: Mapping[str, Callable]
    oracles: Mapping[str, Callable]
    state_names: Callable[..., tuple[str, ...]]
    outputs: Callable[..., Mapping[str, bool]]
    trace_loops: Callable[[Any, int, int], int]
    cp_inference: Callable[[Any], str] | None
    placed: bool = False
    tp_plan: Callable[..., Mapping[str, Any]] | None = None
    cp_forward: Callable[..., Any] | None = None
    ep_forward: Callable[..., Any] | None = None
    new_use: Callable[..., nn.Module] | None = None
    use_tp_plan: Callable[..., Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.oracles) - set(self.ops))
        if unknown:
            raise ValueError(f"runtime kind {self.name!r}: oracles {unknown} are not among its ops")
        object.__setattr__(self, "ops", MappingProxyType(dict(self.ops)))
        object.__setattr__(self, "oracles", MappingProxyType(dict(self.oracles)))


def _registry() -> dict[str, RuntimeKind]:
    from ltmdsl.runtime.kinds import (attention, gated_deltanet, kda, lightning, mamba, mamba2, mla, mlp, mlstm, moe,
                                      parallel, rg_lru, short_conv, transformer_block)

    return {k.name: k for k in (attention.KIND, mla.KIND, mamba.KIND, mamba2.KIND, gated_deltanet.KIND, kda.KIND,
                                short_conv.KIND, lightning.KIND, rg_lru.KIND, mlstm.KIND, parallel.KIND,
                                transformer_block.KIND, mlp.KIND, moe.KIND)}


RUNTIME_REGISTRY: Mapping[str, RuntimeKind] = MappingProxyType(_registry())


def runtime_kind(name: str) -> RuntimeKind:
    """The runtime entry of kind `name`; NoRuntimeModule (naming the kind) when it has none."""
    try:
        return RUNTIME_REGISTRY[name]
    except KeyError:
        raise NoRuntimeModule(
            f"layer kind {name!r} has no runtime module (runtime kinds: {', '.join(RUNTIME_REGISTRY)}); "
            f"add runtime/kinds/{name}.py and register it in runtime/kinds/__init__.py"
        ) from None
