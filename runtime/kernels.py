"""The kernel interface shared by the PyTorch runtime and the Triton back end (docs/CONTRACTS.md).

A `Kernels` instance is an immutable bundle that maps op names to callables; every layer module receives
one at construction (no global state) and calls `kernels.<op>(...)`. The ops are not a fixed list: each
runtime kind declares the reference ops it calls (runtime/kinds/<kind>.py, `RuntimeKind.ops`), the norms
declare theirs (runtime/norm.py `OPS`), and `TORCH_KERNELS` is the union of those declarations. A back end
starts from the reference and overrides only the ops it has kernels for (`Kernels.override`), so a kind
without a Triton kernel runs its PyTorch op on the triton back end, and a new kind never needs a back-end
edit. Asking a bundle for an op nobody declared is an error, never a silent default.

Each reference op sits beside its oracle in its own module: ops_attention, ops_conv, ops_scan (Mamba-1),
ops_ssd (Mamba-2), ops_delta (the gated delta rule), ops_norm. The signatures (sequence dimension explicit
everywhere):

    attention(q [B,Tq,H,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv], *, causal, window, scale) -> [B,Tq,H,Dv]
    attention_decode(q [B,H,D], k_cache [B,S,Hkv,D], v_cache [B,S,Hkv,Dv], *, n_valid, scale) -> [B,H,Dv]
    causal_conv1d(x [B,T,C], weight [C,K], bias, *, prev [B,C,K-1] | None, silu) -> [B,T,C]
    conv_step(x [B,C], state [B,C,K], weight [C,K], bias, *, silu) -> [B,C]            (state in place)
    selective_scan(u, delta [B,T,Di], A [Di,N], Bm, Cm [B,T,N], *, state) -> (y [B,T,Di], state [B,Di,N])
    selective_step(u, delta [B,Di], A [Di,N], Bm, Cm [B,N], state [B,Di,N]) -> [B,Di]    (state in place)
    ssd_scan(x [B,T,Hs,P], dt [B,T,Hs], A [Hs], Bm, Cm [B,T,G,N], *, chunk, state) -> (y, state [B,Hs,P,N])
    ssd_step(x [B,Hs,P], dt [B,Hs], A [Hs], Bm, Cm [B,G,N], state [B,Hs,P,N]) -> [B,Hs,P] (state in place)
    add_rmsnorm(x [...,d], residual [...,d] | None, weight [d], *, eps) -> (normed, summed)
    gated_delta_chunked(q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], g [B,T,Hv(,Dk)], beta [B,T,Hv], *, chunk, state,
                        l2norm, scale) -> (o [B,T,Hv,Dv], state [B,Hv,Dk,Dv])
    gated_delta_step(q, k [B,Hk,Dk], v [B,Hv,Dv], g [B,Hv(,Dk)], beta [B,Hv], state, *, l2norm, scale)
        -> [B,Hv,Dv]                                                                  (state in place)
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Callable, Iterable, Mapping


class UnknownOpError(LookupError):
    """A bundle was asked for (or given an override of) an op that no runtime kind or norm declares."""


class Kernels:
    """An immutable map op name -> callable, read as attributes (`kernels.attention(...)`) or items.

    `name` says which back end built it ("torch", "reference", "triton"); `provider(op)` says whose
    callable an op runs on ("torch" for a reference op a back end did not override).
    """

    __slots__ = ("name", "_ops", "_providers")

    def __init__(self, name: str, ops: Mapping[str, Callable], providers: Mapping[str, str] | None = None):
        bad = [k for k, f in ops.items() if not callable(f)]
        if bad:
            raise TypeError(f"kernel ops {bad} are not callable")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_ops", MappingProxyType(dict(ops)))
        object.__setattr__(self, "_providers", MappingProxyType({k: (providers or {}).get(k, name) for k in ops}))

    # -- reading ------------------------------------------------------------------------------

    def __getitem__(self, op: str) -> Callable:
        try:
            return self._ops[op]
        except KeyError:
            raise UnknownOpError(self._unknown(op)) from None

    def __getattr__(self, op: str) -> Callable:
        if op.startswith("_"):  # copy/pickle probe dunders before __init__ ran
            raise AttributeError(op)
        try:
            return self._ops[op]
        except KeyError:
            raise AttributeError(self._unknown(op)) from None

    def __contains__(self, op: str) -> bool:
        return op in self._ops

    @property
    def ops(self) -> Mapping[str, Callable]:
        """The read-only op table."""
        return self._ops

    def names(self) -> frozenset[str]:
        return frozenset(self._ops)

    def provider(self, op: str) -> str:
        """Which bundle's callable `op` runs on (the back end's name, or "torch" where it fell back)."""
        self[op]
        return self._providers[op]

    def _unknown(self, op: str) -> str:
        return f"no runtime kind declares the kernel op {op!r} (the {self.name} bundle has: {sorted(self._ops)})"

    # -- deriving -----------------------------------------------------------------------------

    def override(self, name: str, ops: Mapping[str, Callable]) -> "Kernels":
        """A new bundle named `name`: this one with `ops` replaced. Every overridden op must already be
        declared (a back end cannot invent an op no kind calls)."""
        unknown = sorted(set(ops) - set(self._ops))
        if unknown:
            raise UnknownOpError(f"{name}: cannot override {unknown}: no runtime kind declares them "
                                 f"(declared: {sorted(self._ops)})")
        providers = dict(self._providers)
        providers.update(dict.fromkeys(ops, name))
        return Kernels(name, {**self._ops, **ops}, providers)

    # -- immutability and display -----------------------------------------------------------------

    def __setattr__(self, key, value):
        raise AttributeError("Kernels bundles are immutable; use override() to derive another")

    def __delattr__(self, key):
        raise AttributeError("Kernels bundles are immutable")

    def __reduce__(self):
        return (Kernels, (self.name, dict(self._ops), dict(self._providers)))

    def __repr__(self) -> str:
        return f"Kernels({self.name!r}, ops={sorted(self._ops)})"


def merge_declarations(declarations: Iterable[tuple[str, Mapping[str, Callable]]]) -> dict[str, Callable]:
    """Union of (declarer, {op: callable}) tables; two declarers naming one op must give the same callable."""
    out: dict[str, Callable] = {}
    owner: dict[str, str] = {}
    for who, table in declarations:
        for op, fn in table.items():
            if op in out and out[op] is not fn:
                raise ValueError(f"kernel op {op!r} is declared differently by {owner[op]!r} and {who!r}")
            out.setdefault(op, fn)
            owner.setdefault(op, who)
    return out


def reference_kernels() -> Kernels:
    """The PyTorch reference: every op declared by the norms and the runtime kinds (`TORCH_KERNELS`)."""
    from ltmdsl.runtime import norm
    from ltmdsl.runtime.kinds import RUNTIME_REGISTRY

    tables = [("norm", norm.OPS)] + [(k.name, k.ops) for k in RUNTIME_REGISTRY.values()]
    return Kernels("torch", merge_declarations(tables))


def oracle_kernels() -> Kernels:
    """The plain oracles (explicit-softmax attention, token-loop scans) where a kind declares one, the
    reference elsewhere (`REFERENCE_KERNELS`; used by tests and as a debugging back end)."""
    from ltmdsl.runtime.kinds import RUNTIME_REGISTRY

    oracles = merge_declarations((k.name, k.oracles) for k in RUNTIME_REGISTRY.values())
    return reference_kernels().override("reference", oracles)


_BUNDLES = {"TORCH_KERNELS": reference_kernels, "REFERENCE_KERNELS": oracle_kernels}


@functools.cache
def __getattr__(attr: str) -> Kernels:
    """`TORCH_KERNELS` and `REFERENCE_KERNELS`, built on first use (after every kind module is importable,
    so importing a kind module never waits on the registry) and then the same object every time."""
    try:
        return _BUNDLES[attr]()
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}") from None
