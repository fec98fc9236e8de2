"""Inference caches: what a model keeps between calls, allocated once up front.

The model's cache is the list of its sub-layers' caches, one entry per sub-layer of the stack (tied
sub-layers share weights, never caches). Each runtime kind (runtime/kinds/<kind>.py) allocates its own
entry, a `LayerCache` that lists its tensors and names the memory-model component its bytes belong to
("kv_cache" or "recurrent_state"); a kind that keeps nothing between calls (MLP, MoE) declares so and
its entry is None. This module knows no concrete kind: it only sums, zeroes and copies what the entries
report.

`Cache.nbytes()` is exactly `ltmdsl.memory.cache_bytes(...)` kv_cache + recurrent_state (docs/CONTRACTS.md),
because each kind's allocation and its memory facet follow the same formulas. The cache advances in
place: `seen` counts the tokens consumed.

Under tensor parallelism (`tp` = t > 1, a model split by ltmdsl.distributed) each rank's cache holds its own
heads only: every kind allocates from its local head or channel counts (`CacheRequest.per_rank`: KV heads / t,
SSM heads / t, conv channels / t), and what its tp plan replicates (MLA's latent and shared RoPE key) whole,
the memory model's per-GPU convention (its cache facets at tp = t).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ltmdsl.ir import ModelIR

CONV_TAPS = ("full", "minus_one")
#: The memory model's names for cache bytes (ltmdsl.memory.cache_bytes keys), in its order.
COMPONENTS = ("kv_cache", "recurrent_state")


@dataclass(frozen=True)
class CacheRequest:
    """What a kind needs to size its cache: batch B, max_context tokens, the two cache dtypes (KV and
    recurrent state), the conv-tap layout ("full": K taps as state-spaces/mamba, "minus_one": K-1 as
    vLLM), the device and the tensor-parallel degree t the module was split over (1: whole)."""

    batch_size: int
    max_context: int
    kv_dtype: torch.dtype
    state_dtype: torch.dtype
    conv_taps: str
    device: torch.device | str
    tp: int = 1

    def per_rank(self, n: int, what: str) -> int:
        """This rank's share n / t of a width its kind's tp plan splits (heads, channels); ValueError naming
        `what` when t does not divide it (the plan refuses such a model before it is split)."""
        if n % self.tp:
            raise ValueError(f"tp = {self.tp} does not divide the {n} {what} of this cache")
        return n // self.tp

    def kv_per_rank(self, n: int) -> int:
        """This rank's KV heads of `n`: n / t, or one when t is a multiple of n (fewer KV heads than ranks: each
        rank holds the KV head its query heads use, as tp replicates them, Megatron-LM's convention); ValueError
        otherwise (the plan refuses such a model before it is split)."""
        if self.tp > n and self.tp % n == 0:
            return 1
        return self.per_rank(n, "KV heads")


class LayerCache(abc.ABC):
    """One sub-layer's cache. Subclasses are dataclasses whose tensor fields `tensors()` lists; the
    class attribute `component` names the memory-model component their bytes count towards."""

    component: ClassVar[str]

    @abc.abstractmethod
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this entry holds."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def by_component(self) -> dict[str, int]:
        """Bytes per memory-model component: all of them under `component` (a parallel layer's cache, which
        holds two branches' caches, splits them)."""
        return {self.component: self.nbytes()}

    def zero_(self) -> None:
        for t in self.tensors():
            t.zero_()

    def clone(self) -> "LayerCache":
        """A deep copy: every tensor field cloned, the other fields shared (they are immutable)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(
            self, **{k: v.clone() for k, v in fields.items() if isinstance(v, torch.Tensor)}
        )


class Cache:
    """Per-sub-layer cache entries (a `LayerCache` or None) plus the number of tokens consumed (`seen`)."""

    def __init__(self, entries: list[LayerCache | None], batch_size: int, max_context: int):
        for e in entries:
            if e is not None and getattr(e, "component", None) not in COMPONENTS:
                raise ValueError(f"{type(e).__name__}.component must be one of {COMPONENTS}")
        self.layers = entries
        self.batch_size = batch_size
        self.max_context = max_context
        self.seen = 0

    def nbytes(self) -> int:
        """Bytes held by every cache tensor."""
        return sum(e.nbytes() for e in self.layers if e is not None)

    def breakdown(self) -> dict[str, int]:
        """Bytes as the memory model names them: {"kv_cache": ..., "recurrent_state": ...}."""
        out = dict.fromkeys(COMPONENTS, 0)
        for e in self.layers:
            if e is not None:
                for component, n in e.by_component().items():
                    out[component] += n
        return out

    def reset(self) -> None:
        """Forget every token: zero the tensors and the position counter."""
        for e in self.layers:
            if e is not None:
                e.zero_()
        self.seen = 0

    def clone(self) -> "Cache":
        """A deep copy (used to branch a prefix, and by the tests)."""
        out = Cache([None if e is None else e.clone() for e in self.layers], self.batch_size, self.max_context)
        out.seen = self.seen
        return out

    def __repr__(self) -> str:
        return f"Cache(batch={self.batch_size}, max_context={self.max_context}, seen={self.seen}, bytes={self.nbytes()})"


def allocate(
    model: ModelIR,
    *,
    batch_size: int,
    max_context: int,
    kv_dtype: torch.dtype,
    state_dtype: torch.dtype,
    conv_taps: str = "full",
    device: torch.device | str = "cpu",
    tp: int = 1,
) -> Cache:
    """Allocate a zeroed cache for `batch_size` sequences of at most `max_context` tokens: each sub-layer's
    entry comes from its runtime kind (`new_cache`), None for kinds that keep no state; `tp`: the degree the
    model was split over, each entry then holding one rank's heads (module docstring)."""
    from ltmdsl.runtime.kinds import runtime_kind

    if conv_taps not in CONV_TAPS:
        raise ValueError(f"conv_taps must be one of {CONV_TAPS}, not {conv_taps!r}")
    if batch_size < 1 or max_context < 1 or tp < 1:
        raise ValueError("batch_size, max_context and tp must be positive")
    request = CacheRequest(batch_size, max_context, kv_dtype, state_dtype, conv_taps, device, tp)
    entries: list[LayerCache | None] = []
    for layer in model.layers:
        new_cache = runtime_kind(layer.kind).new_cache
        entries.append(None if new_cache is None else new_cache(layer.mixer, request))
    return Cache(entries, batch_size, max_context)
