"""Dense feed-forward sub-layer (Llama's names): down(act(gate(x), up(x))), and the FFN activations.

Activations (`act`): swiglu = silu(gate) * up, geglu = gelu(gate) * up (exact erf GELU), geglu_tanh = the
same with GELU's tanh approximation (RecurrentGemma, transformers' gelu_pytorch_tanh), gelu = gelu(up),
relu2 = relu(up)^2 (Primer), relu = relu(up). gate_proj exists only for the gated ones. The MoE experts
(runtime/kinds/moe.py) use the same activations.

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, no cache (an MLP keeps nothing between
calls), no kernel ops (plain matmuls), its parameter names and its tensor-parallel plan (Megatron's: gate
and up split by output columns, down by input rows, one all-reduce after down).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.mlp import MLPConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, cp_local, no_loops

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels

GATED = ("swiglu", "geglu", "geglu_tanh")
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "gelu", "relu2", "relu")


def activate(name: str, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """The hidden activation of an FFN: gate, up [..., F] (gate None when not gated) -> [..., F]."""
    if name == "swiglu":
        return F.silu(gate) * up
    if name == "geglu":
        return F.gelu(gate) * up
    if name == "geglu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if name == "gelu":
        return F.gelu(up)
    if name == "relu2":
        return torch.relu(up).square()
    if name == "relu":
        return torch.relu(up)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def hidden_inplace(name: str, gate_proj, up_proj, x: torch.Tensor) -> torch.Tensor:
    """`activate(name, gate_proj(x), up_proj(x))` without autograd, in place where the activation allows
    (gate_proj, up_proj: the projections, modules or callables; gate_proj None when not gated):
    x [..., d] -> [..., F], the same values with at most two [..., F] tensors live (act(gate) and up; for
    gelu, up and gelu(up)) and one for relu and relu2, instead of gate, up, act(gate) and the product."""
    if name in GATED:
        h = gate_proj(x)  # [..., F]
        if name == "swiglu":
            F.silu(h, inplace=True)
        else:  # GELU has no in-place form
            h = F.gelu(h, approximate="tanh" if name == "geglu_tanh" else "none")  # [..., F]
        return h.mul_(up_proj(x))  # [..., F]
    h = up_proj(x)  # [..., F]
    if name == "gelu":
        return F.gelu(h)
    if name == "relu2":
        return torch.relu_(h).square_()
    if name == "relu":
        return torch.relu_(h)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class MLP(nn.Module):
    """Dense FFN: x [..., d] -> [..., d]. gate_proj only for gated activations."""

    def __init__(self, cfg: MLPConfig, d: int):
        super().__init__()
        self.cfg = cfg
        self.gate_proj = nn.Linear(d, cfg.d_ff, bias=cfg.bias) if cfg.gated else None
        self.up_proj = nn.Linear(d, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, d, bias=cfg.bias)

    def init_weights(self, gen: torch.Generator) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            if lin is not None:
                init.linear_(lin, gen)

    def forward(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: at most two [..., F] tensors live
            return self.down_proj(hidden_inplace(self.cfg.activation, self.gate_proj, self.up_proj, x))
        gate = self.gate_proj(x) if self.gate_proj is not None else None  # [..., F]
        return self.down_proj(activate(self.cfg.activation, gate, self.up_proj(x)))

    def step(self, x: torch.Tensor, state=None, pos0: int = 0) -> torch.Tensor:
        return self.forward(x)


def build(cfg: MLPConfig, d: int, eps: float, kernels: "Kernels") -> MLP:
    """The uniform constructor of the registry (an MLP needs neither a norm eps nor kernels)."""
    return MLP(cfg, d)


def outputs(cfg: MLPConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): down_proj writes the stream; its input is the activation of two small projections."""
    return {"down_proj.weight": False}


def state_names(cfg: MLPConfig) -> tuple[str, ...]:
    """The parameters an `MLP` owns: gate_proj only when gated, biases when configured."""
    projs = (["gate_proj"] if cfg.gated else []) + ["up_proj", "down_proj"]
    return tuple(f"{p}.{w}" for p in projs for w in (("weight", "bias") if cfg.bias else ("weight",)))


def tp_plan(cfg: MLPConfig, tp: int) -> dict:
    """d_ff split over tp: gate_proj / up_proj column-wise ([d, F/t] each), down_proj row-wise ([F/t, d])."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if cfg.d_ff % tp:
        raise TensorParallelUnsupported(f"tp = {tp} does not divide the mlp's d_ff = {cfg.d_ff}")
    plan = {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
    if cfg.gated:
        plan["gate_proj"] = ColwiseParallel()
    return plan


def cp_forward(module, x: torch.Tensor, cp) -> torch.Tensor:
    """Token-local: each context-parallel rank runs its own tokens, nothing crosses ranks. (The class's
    forward, not the instance's: under cp the instance's forward is this function.)"""
    return type(module).forward(module, x)


KIND = RuntimeKind(
    name="mlp",
    module=MLP,
    build=build,
    new_cache=None,
    ops={},
    oracles={},
    state_names=state_names,
    outputs=outputs,
    trace_loops=no_loops,
    cp_inference=cp_local,
    tp_plan=tp_plan,
    cp_forward=cp_forward,
)
