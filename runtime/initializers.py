"""Seeded weight initialisation: the helpers every module's `init_weights(gen)` uses, and the one rule
that sizes what each sub-layer writes into the residual stream.

**The residual stream at init.** Embeddings and every matrix are drawn normal(0, STD), STD = 0.02 (GPT-2,
Megatron, Llama), and each kind keeps its own published init for the rest (Mamba-2's A uniform in [1, 16]
and dt log-uniform in [1e-3, 0.1]; xLSTM's gate biases; ...). The *output projections* of each sub-layer
(the matrices that write into the stream, which each runtime kind names in `RuntimeKind.outputs`) are scaled
as they are drawn (`residual_outputs`), so that the stream after all the sub-layers stays of the
embeddings' scale:

- a projection whose input is a plain product of small projections (attention's o_proj, an MLP's
  down_proj, Mamba-1's out_proj, ...) is drawn at STD / sqrt(N), N the number of residual branches the
  stack adds (the scaled init of GPT-2, Megatron's `scaled_init_method_normal` with N = 2 * num_layers,
  and mamba_ssm's `rescale_prenorm_residual`);
- a projection whose input is normalised to unit RMS (Mamba-2's gated RMSNorm, Gated DeltaNet's and KDA's
  output norms, MiniMax's lightning norm, the mLSTM's head norm) is drawn at STD / sqrt(fan_in * N), so its
  branch adds about STD / sqrt(N) RMS. Drawn at STD, such a projection adds STD * sqrt(fan_in) to the stream
  (0.23 for fan_in 128: one Mamba-2 sub-layer made ltm-tiny's stream 9x its embeddings), so the tokens'
  own embeddings start as a small part of what every later sub-layer reads.

With N branches each adding at most about STD / sqrt(N), the stream's RMS after the stack is within a small
factor of the embeddings' (tests/runtime/test_rt_init.py states and checks the factor for every kind). A
sub-layer with a post-norm (sandwich norms) adds what that norm makes of its output, whatever the scale.
Only `init_weights` applies this: weights loaded from a checkpoint (`from_hf`, `load_checkpoint`) are
never touched.

All draws come from an explicit `torch.Generator` (no global RNG state is touched), in fp32 on the CPU,
so one seed gives the same weights on every machine and dtype. Every drawn value reaches its parameter
through `assign_`, which also fills a sharded parameter (a DTensor under tensor parallelism or FSDP) with
its own shard of the same full draw: a distributed model gets the single-process model's weights while
holding one full parameter at a time, never the full model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import torch
from torch import nn

STD = 0.02  # normal(0, 0.02) for linear and embedding weights, as GPT-2 / Llama do


def layout_of(module: torch.nn.Module, name: str):
    """The RowLayout of `module`'s parameter `name` when tensor parallelism laid its rows out apart from the
    stored ones (a fused tensor split by segments, replicated KV heads: runtime.tensor_parallel), else None."""
    return getattr(module, "tp_layouts", {}).get(name)


def draw_shape(p: torch.Tensor, layout=None) -> tuple[int, ...]:
    """The shape a parameter's values are drawn in: its stored shape (the single-process one)."""
    return tuple(p.shape) if layout is None else layout.stored_shape(p.shape)


@torch.no_grad()
def assign_(p: torch.Tensor, full: torch.Tensor, layout=None) -> None:
    """p <- full (broadcast to p's stored shape), times the parameter's output scale while `residual_outputs`
    names it. A DTensor parameter takes its local shard of `full`, cut the way its placements say, without
    communication (every rank drew the same `full`); one whose tp rows are laid out apart from the stored
    rows (`layout`, `layout_of`) takes `full`'s rows in that layout first."""
    scale = getattr(p, "_init_scale", None)  # set while `residual_outputs` is open
    if scale is not None:
        full = full * scale  # in fp32, before the cast: the same weights in every dtype
    full = full.expand(draw_shape(p, layout))
    if layout is not None:
        from ltmdsl.runtime.tensor_parallel import tp_side

        full = tp_side(full, layout)  # the tp-side rows, whose Shard(0) is each rank's part
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
def normal_(p: torch.Tensor, gen: torch.Generator, std: float = STD, layout=None) -> None:
    assign_(p, torch.randn(draw_shape(p, layout), generator=gen) * std, layout)


@torch.no_grad()
def uniform_(p: torch.Tensor, gen: torch.Generator, bound: float, layout=None) -> None:
    assign_(p, (torch.rand(draw_shape(p, layout), generator=gen) * 2 - 1) * bound, layout)


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
    normal_(lin.weight, gen, std, layout_of(lin, "weight"))
    zeros_(lin.bias)


@torch.no_grad()
def dt_bias_(p: torch.Tensor, gen: torch.Generator, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
    """Mamba's time-step init: dt log-uniform in [dt_min, dt_max], stored as softplus^-1(dt)."""
    u = torch.rand(p.shape, generator=gen)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    assign_(p, dt + torch.log(-torch.expm1(-dt)))


def output_scale(branches: int, fan_in: int, normalised: bool) -> float:
    """The factor on an output projection drawn at STD (module docstring): 1 / sqrt(branches), and for a
    projection reading unit-RMS features 1 / sqrt(fan_in * branches)."""
    if branches < 1 or fan_in < 1:
        raise ValueError(f"output_scale needs branches >= 1 and fan_in >= 1 (got {branches}, {fan_in})")
    return 1.0 / math.sqrt(branches * (fan_in if normalised else 1))


@contextlib.contextmanager
def residual_outputs(mixer: nn.Module, outputs: Mapping[str, bool], branches: int) -> Iterator[None]:
    """While open, every draw `assign_` writes into one of `mixer`'s output projections is scaled by
    `output_scale` (in fp32, before the cast). `outputs` maps each one's parameter name (relative to the
    mixer) to whether its input is normalised; its fan-in is the weight's last dimension ([out, in] for a
    Linear, [E, d, F] for stacked experts). The kind's own `init_weights` runs inside, unchanged: the draw
    order, and so every other parameter, is exactly what it was."""
    scaled = [mixer.get_parameter(name) for name in outputs]
    for p, normalised in zip(scaled, outputs.values()):
        p._init_scale = output_scale(branches, p.shape[-1], normalised)
    try:
        yield
    finally:
        for p in scaled:
            del p._init_scale
