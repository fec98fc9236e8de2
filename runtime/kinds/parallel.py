"""Two mixers in parallel inside one residual sub-layer (Falcon-H1, Hymba), as transformers' FalconH1DecoderLayer
combines its attention and Mamba-2 mixer:

    y = a_out * A(a_in * x) + b_out * B(b_in * x)        x [B, T, d] the sub-layer's normed input

Each branch is the module its own kind builds (runtime registry), named `a.*` and `b.*` under the mixer; its
cache is the pair of the branches' caches (`ParallelCache`), whose bytes count towards each branch's own
component. A branch kind that depends on its place in the stack (lightning) is refused; expert parallelism
is refused naming the kind (no plan yet); tensor and context parallelism run each branch's own plan / form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ltmdsl.kinds.parallel import ParallelConfig
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported


def runtime_kind(name: str) -> RuntimeKind:
    """The runtime entry of a branch's kind (the registry, which imports this module, is complete by then)."""
    from ltmdsl.runtime.kinds import runtime_kind as entry

    return entry(name)


@dataclass
class ParallelCache(LayerCache):
    """The two branches' caches (None for a branch that keeps nothing); `by_component` splits the bytes."""

    a: LayerCache | None
    b: LayerCache | None
    component: ClassVar[str] = "recurrent_state"  # nominal: `by_component` says where each byte belongs

    def parts(self) -> tuple[LayerCache, ...]:
        return tuple(p for p in (self.a, self.b) if p is not None)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for p in self.parts() for t in p.tensors())

    def by_component(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.parts():
            for k, v in p.by_component().items():
                out[k] = out.get(k, 0) + v
        return out

    def clone(self) -> "ParallelCache":
        return dataclasses.replace(self, a=None if self.a is None else self.a.clone(),
                                   b=None if self.b is None else self.b.clone())


class Parallel(nn.Module):
    """x [..., d] -> a_out * a(a_in * x) + b_out * b(b_in * x); parameters `a.*`, `b.*`."""

    def __init__(self, cfg: ParallelConfig, d: int, eps: float, kernels):
        super().__init__()
        self.cfg = cfg
        for name, branch, _, _ in cfg.branches:
            entry = runtime_kind(branch.kind)
            if entry.placed:
                raise ValueError(f"a parallel layer's branch cannot be {branch.kind}, whose layers depend on their "
                                 "place in the stack")
            self.add_module(name, entry.build(branch, d, eps, kernels))

    def init_weights(self, gen: torch.Generator) -> None:
        self.a.init_weights(gen)
        self.b.init_weights(gen)

    def combine(self, x: torch.Tensor, run) -> torch.Tensor:
        """sum over the branches of out * run(name, kind, module, in * x): x [..., d] -> [..., d]."""
        out = None
        for name, branch, m_in, m_out in self.cfg.branches:
            xin = x * m_in if m_in != 1.0 else x  # [..., d]
            y = run(name, branch.kind, getattr(self, name), xin)  # [..., d]
            y = y * m_out if m_out != 1.0 else y
            out = y if out is None else out + y
        return out

    def _run(self, x: torch.Tensor, state: ParallelCache | None, pos0: int, step: bool) -> torch.Tensor:
        def run(name, _kind, module, xin):
            sub = None if state is None else getattr(state, name)
            return module.step(xin, sub, pos0) if step else module(xin, sub, pos0)

        return self.combine(x, run)

    def forward(self, x: torch.Tensor, state: ParallelCache | None = None, pos0: int = 0) -> torch.Tensor:
        return self._run(x, state, pos0, step=False)  # [B, T, d]

    def step(self, x: torch.Tensor, state: ParallelCache | None = None, pos0: int = 0) -> torch.Tensor:
        return self._run(x, state, pos0, step=True)  # [B, d]


def new_cache(cfg: ParallelConfig, req: CacheRequest) -> ParallelCache | None:
    parts = []
    for _, branch, _, _ in cfg.branches:
        make = runtime_kind(branch.kind).new_cache
        parts.append(None if make is None else make(branch, req))
    return None if parts == [None, None] else ParallelCache(*parts)


def outputs(cfg: ParallelConfig) -> dict[str, bool]:
    """Both branches' output projections under `a.` and `b.` (each branch adds to the stream)."""
    return {f"{name}.{n}": normalised for name, branch, _, _ in cfg.branches
            for n, normalised in runtime_kind(branch.kind).outputs(branch).items()}


def state_names(cfg: ParallelConfig) -> tuple[str, ...]:
    """The branches' parameter names under `a.` and `b.`."""
    return tuple(f"{name}.{n}" for name, branch, _, _ in cfg.branches
                 for n in runtime_kind(branch.kind).state_names(branch))


def cp_forward(module: Parallel, x: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's tokens x [B, T/cp, d]: each branch runs its own kind's cp_forward on the
    scaled input (what crosses ranks is each branch's business), and the scaled outputs are summed."""
    def run(name, kind, branch, xin):
        fwd = runtime_kind(kind).cp_forward
        if fwd is None:
            raise ValueError(f"the parallel layer's branch {name} ({kind}) has no context-parallel form")
        return fwd(branch, xin, cp)  # [B, T, d]

    return module.combine(x, run)


def tp_plan(cfg: ParallelConfig, tp: int) -> dict:
    """Each branch split by its own kind's plan, under its name (a.*, b.*; the branch's "" key, its own
    parameters, becomes the branch itself). Each branch's output is whole after its own row-parallel
    projection, so the scaled sum is too."""
    plan = {}
    for name, branch, _, _ in cfg.branches:
        own = runtime_kind(branch.kind).tp_plan
        if own is None:
            raise TensorParallelUnsupported(f"the parallel layer's branch {name} ({branch.kind}) has no "
                                            "tensor-parallel plan")
        try:
            sub = own(branch, tp)
        except TensorParallelUnsupported as e:
            raise TensorParallelUnsupported(f"branch {name}: {e}") from None
        plan |= {f"{name}.{key}" if key else name: style for key, style in sub.items()}
    return plan


def trace_loops(c, tokens: int, keys: int) -> int:
    """Both branches' loops, run one after the other (ltmdsl.measure.cost)."""
    return sum(runtime_kind(x.kind).trace_loops(x, tokens, keys) for x in (c.a, c.b))


KIND = RuntimeKind(
    name="parallel",
    module=Parallel,
    build=Parallel,
    new_cache=new_cache,
    ops={},
    oracles={},
    state_names=state_names,
    outputs=outputs,
    trace_loops=trace_loops,
    cp_inference=None,
    cp_forward=cp_forward,
    tp_plan=tp_plan,
)
