"""Seeded weight initialisation helpers; every module's `init_weights(gen)` uses these.

All draws come from an explicit `torch.Generator` (no global RNG state is touched), in fp32 on the CPU,
so one seed gives the same weights on every machine and dtype. Every drawn value reaches its parameter
through `assign_`, which also fills a sharded parameter (a DTensor under tensor parallelism or FSDP) with
its own shard of the same full draw: a distributed model gets the single-process model's weights while
holding one full parameter at a time, never the full model.
"""

from __future__ import annotations

import math

import torch

STD = 0.02  # normal(0, 0.02) for linear and embedding weights, as GPT-2 / Llama do


def segments_of(module: torch.nn.Module, name: str):
    """(sizes, t) when tensor parallelism split `module`'s fused parameter `name` by segments
    (runtime.tensor_parallel.segmented), else None."""
    return getattr(module, "tp_segments", {}).get(name)


@torch.no_grad()
def assign_(p: torch.Tensor, full: torch.Tensor, segments=None) -> None:
    """p <- full (broadcast to p's shape). A DTensor parameter takes its local shard of `full`, cut the
    way its placements say, without communication (every rank drew the same `full`); a fused one split by
    segments (`segments` = (sizes, t), `segments_of`) takes its rows of every segment."""
    full = full.expand(p.shape)
    if segments is not None:
        from ltmdsl.runtime.tensor_parallel import segment_order

        full = full[segment_order(*segments)]  # the tp order of the rows, whose Shard(0) is each rank's part
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        full = full.to(device=p.device, dtype=p.dtype).contiguous()
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
        return
    p.copy_(full)


def _is_dtensor(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


@torch.no_grad()
def normal_(p: torch.Tensor, gen: torch.Generator, std: float = STD, segments=None) -> None:
    assign_(p, torch.randn(p.shape, generator=gen) * std, segments)


@torch.no_grad()
def uniform_(p: torch.Tensor, gen: torch.Generator, bound: float, segments=None) -> None:
    assign_(p, (torch.rand(p.shape, generator=gen) * 2 - 1) * bound, segments)


@torch.no_grad()
def ones_(p: torch.Tensor) -> None:
    p.fill_(1.0)


@torch.no_grad()
def zeros_(p: torch.Tensor | None) -> None:
    if p is not None:
        p.zero_()


@torch.no_grad()
def linear_(lin: torch.nn.Linear, gen: torch.Generator, std: float = STD) -> None:
    """normal(0, std) weight, zero bias."""
    normal_(lin.weight, gen, std, segments_of(lin, "weight"))
    zeros_(lin.bias)


@torch.no_grad()
def dt_bias_(p: torch.Tensor, gen: torch.Generator, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba's time-step init: dt log-uniform in [dt_min, dt_max], stored as softplus^-1(dt)."""
    u = torch.rand(p.shape, generator=gen)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    assign_(p, dt + torch.log(-torch.expm1(-dt)))
