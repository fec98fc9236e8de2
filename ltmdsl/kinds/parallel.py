"""Two mixers in parallel inside one residual sub-layer (Falcon-H1, Hymba): its IR config and every pure facet.

    layer attn = attention(heads = 8, kv_heads = 2)
    layer ssm  = mamba2(d_state = 64)
    layer mix  = parallel(a = attn, b = ssm, a_in = 0.5, a_out = 0.8, b_out = 0.3)

Both branches read the same normed input (the sub-layer's one pre-norm), each times its input multiplier, and
their outputs, each times its output multiplier, are summed before the residual add:
    x = x + residual_scale * (a_out * A(a_in * norm(x)) + b_out * B(b_in * norm(x)))
as transformers' FalconH1DecoderLayer does with attention_in_multiplier, attention_out_multiplier and
ssm_out_multiplier (the branches' own muP factors inside them are folded into their weights on import).
A branch is any other layer definition without its own `norm` / `post_norm` (the sub-layer's apply).

Everything else is the sum of the two branches: parameters, caches (labelled `parallel/<kind>/<part>`), FLOPs
and what tensor and expert parallelism must divide. Prefill workspace: the larger branch's, plus the first
branch's output held while the second runs (a * n * d, n = b * Cc/c tokens). Training activations: both
branches', the sub-layer's norm counted once, plus each scaled input (a multiplier != 1 makes a new tensor
the branch's first projection keeps: a*sbh, replicated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split, none_per_use
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class ParallelConfig(LayerConfig):
    """Two branch configs run on the same normed input and summed (module docstring)."""

    a: LayerConfig
    b: LayerConfig
    a_in: float = 1.0
    b_in: float = 1.0
    a_out: float = 1.0
    b_out: float = 1.0
    kind: str = field(default="parallel", init=False)

    @property
    def branches(self) -> tuple[tuple[str, LayerConfig, float, float], ...]:
        """(name, config, input multiplier, output multiplier) of each branch, in order."""
        return ("a", self.a, self.a_in, self.a_out), ("b", self.b, self.b_in, self.b_out)


def _kind(c: LayerConfig) -> Kind:
    from ltmdsl.kinds import kind_of  # the registry imports this module

    return kind_of(c)


def build(v: dict[str, Any], ctx: ModelContext) -> ParallelConfig:
    for name in ("a", "b"):
        if not isinstance(v[name], LayerConfig):
            raise CheckError(f"branch {name} must name a layer definition", name)
        if v[name].kind == "parallel":
            raise CheckError(f"branch {name} is itself a parallel layer; nest the branches in one", name)
    return ParallelConfig(v["a"], v["b"], float(v["a_in"]), float(v["b_in"]), float(v["a_out"]),
                          float(v["b_out"]))


def count(c: ParallelConfig, d: int) -> int:
    return sum(_kind(x).count(x, d) for _, x, _, _ in c.branches)


def inactive(c: ParallelConfig, d: int) -> int:
    return sum(_kind(x).inactive(x, d) for _, x, _, _ in c.branches)


def split(c: ParallelConfig, d: int) -> Split:
    parts = [_kind(x).split(x, d) for _, x, _, _ in c.branches]
    return Split(tp=tuple(p for s in parts for p in s.tp), ep=tuple(p for s in parts for p in s.ep),
                 etp=tuple(p for s in parts for p in s.etp), expert_params=sum(s.expert_params for s in parts), replicated=sum(s.replicated for s in parts),
                 grouped=tuple(g for s in parts for g in s.grouped))


def context_check(c: ParallelConfig, context: int) -> str | None:
    return next((why for _, x, _, _ in c.branches if (why := _kind(x).context_check(x, context))), None)


def cache(c: ParallelConfig, s) -> tuple[CacheTerm, ...]:
    """Both branches' terms, each labelled `<branch kind>[/<part>]` under this kind."""
    return tuple(CacheTerm(t.component, x.kind if t.part is None else f"{x.kind}/{t.part}", t.dtype, t.bytes)
                 for _, x, _, _ in c.branches for t in _kind(x).cache(x, s))


def workspace(c: ParallelConfig, d: int, s):
    tok = per_replica(B, s.dp) * Smallest(C, T) / R(s.cp)  # b * Cc / c
    first, second = (_kind(x).workspace(x, d, s) for _, x, _, _ in c.branches)
    return Largest(first, second) + s.activation_dtype.bytes * tok * d


def stored(c: ParallelConfig, x, selective: bool):
    out = sum(_kind(b).stored(b, x, selective) for _, b, _, _ in c.branches) - x.base
    scaled = sum(1 for _, _, m, _ in c.branches if m != 1.0)
    return out + scaled * x.within(x.a * x.tok * x.h)


def flops(c: ParallelConfig) -> dict[str, Flops]:
    out: dict[str, Flops] = {}
    for _, x, _, _ in c.branches:
        for name, f in _kind(x).flops(x).items():
            old = out.get(name)
            out[name] = f if old is None else Flops(old.per_token + f.per_token, old.prefill + f.prefill)
    return out


def dims(c: ParallelConfig) -> str:
    parts = []
    for name, x, m_in, m_out in c.branches:
        scales = "".join(f" {w}={m:g}" for w, m in (("in", m_in), ("out", m_out)) if m != 1.0)
        parts.append(f"{name}: {x.kind} {_kind(x).dims(x)}{scales}")
    return " | ".join(parts)


def backward(c: ParallelConfig, x):
    """The larger branch's backward beside the other branch's output gradient, a*tok*d (replicated)."""
    first, second = (_kind(b).backward(b, x) for _, b, _, _ in c.branches)
    return Largest(first, second) + x.rep(x.a * x.tok * x.h)


KIND = Kind(
    name="parallel",
    doc="Two mixers on the same normed input, their scaled outputs summed in one residual (Falcon-H1, Hymba).",
    config=ParallelConfig,
    params=(
        Param("a", "layer", required=True, doc="the first branch: a layer definition"),
        Param("b", "layer", required=True, doc="the second branch: a layer definition"),
        Param("a_in", "float", 1.0, min=1e-9, doc="multiplier on branch a's input"),
        Param("b_in", "float", 1.0, min=1e-9, doc="multiplier on branch b's input"),
        Param("a_out", "float", 1.0, min=1e-9, doc="multiplier on branch a's output"),
        Param("b_out", "float", 1.0, min=1e-9, doc="multiplier on branch b's output"),
    ),
    is_ffn=False,
    build=build,
    count=count,
    inactive=inactive,
    split=split,
    context_check=context_check,
    cache=cache,
    workspace=workspace,
    stored=stored,
    backward=backward,
    flops=flops,
    dims=dims,
    per_use=none_per_use,
)
