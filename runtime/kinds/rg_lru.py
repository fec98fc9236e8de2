"""RecurrentGemma's recurrent block (Griffin's RG-LRU), as transformers' RecurrentGemmaRecurrentBlock computes it.

    y = act(linear_y(u))                                       [B,T,W]
    x = causal_conv1d(linear_x(u))                             depthwise, K taps, with bias, no activation
    gate_x, gate_a = sigmoid(blockdiag(x) + bias)              H blocks of W/H (input and recurrence gates)
    h = rglru_scan(x, gate_x, gate_a, a_param, reset at position 0)    [B,T,W]
    linear_out(h * y) -> [B,T,d]

Position 0 of a sequence is a reset, as transformers' `position_ids == 0`: the input there is not scaled by
sqrt(1 - a^2). With a cache the conv taps and h carry over; `step` is the one-token recurrence.

The runtime entry `KIND` (runtime/kinds/__init__.py): the module, its `ConvLruState` allocation (conv taps
[B, W, K or K-1], h [B, W]), the kernel ops it calls (causal_conv1d, conv_step, rglru_scan, rglru_step)
and its parameter names (transformers': linear_x, linear_y, linear_out, conv_1d, rg_lru.*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ltmdsl.kinds.rg_lru import RgLruConfig
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime import ops_conv, ops_rglru
from ltmdsl.runtime.cache import CacheRequest, LayerCache
from ltmdsl.runtime.chunk_recompute import recompute
from ltmdsl.runtime.tensor_parallel import local, shard_parameters
from ltmdsl.runtime.kinds import RuntimeKind, TensorParallelUnsupported, chunk_loops, cp_passed
from ltmdsl.runtime.kinds.short_conv import conv_step_with_taps, conv_with_taps, taps_for

if TYPE_CHECKING:
    from ltmdsl.runtime.kernels import Kernels

ACT = {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}


@dataclass
class ConvLruState(LayerCache):
    """The conv taps conv [B, W, K or K-1] and the RG-LRU state h [B, W], in the state dtype."""

    component: ClassVar[str] = "recurrent_state"
    conv: torch.Tensor
    h: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.conv, self.h)


def new_cache(cfg: RgLruConfig, req: CacheRequest) -> ConvLruState:
    """Zeroed conv taps [B, W, taps] and h [B, W] in the state dtype (W / t channels on a tensor-parallel rank)."""
    B, dt, dev = req.batch_size, req.state_dtype, req.device
    W = req.per_rank(cfg.width, "channels")
    conv = torch.zeros(B, W, taps_for(cfg.d_conv, req), dtype=dt, device=dev)  # [B, W, taps]
    return ConvLruState(conv, torch.zeros(B, W, dtype=dt, device=dev))  # h [B, W]


def outputs(cfg: RgLruConfig) -> dict[str, bool]:
    """Output projections for the init (runtime.initializers): linear_out reads the recurrence times the gelu branch, no norm."""
    return {"linear_out.weight": False}


def state_names(cfg: RgLruConfig) -> tuple[str, ...]:
    """The parameters a `RecurrentBlock` owns (transformers' RecurrentGemmaRecurrentBlock names)."""
    linears = [f"{n}.{w}" for n in ("linear_y", "linear_x", "linear_out") for w in ("weight", "bias")]
    lru = [f"rg_lru.{n}" for n in ("recurrent_param", "input_gate_weight", "input_gate_bias",
                                    "recurrent_gate_weight", "recurrent_gate_bias")]
    return tuple(linears + ["conv_1d.weight", "conv_1d.bias"] + lru)


def _rglru_oracle(x, gate_x, gate_a, a_param, *, reset, state, chunk):
    """The token-loop oracle behind the chunked op's signature (the oracle has no chunk length)."""
    return ops_rglru.rglru_scan_reference(x, gate_x, gate_a, a_param, reset=reset, state=state)


class RgLru(nn.Module):
    """Holds the RG-LRU's parameters (a_param and the block-diagonal gates) under transformers' names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        bw = width // heads
        self.heads = heads
        self.recurrent_param = nn.Parameter(torch.empty(width))  # [W]
        self.input_gate_weight = nn.Parameter(torch.empty(heads, bw, bw))  # [H, W/H, W/H]
        self.input_gate_bias = nn.Parameter(torch.empty(heads, bw))  # [H, W/H]
        self.recurrent_gate_weight = nn.Parameter(torch.empty(heads, bw, bw))
        self.recurrent_gate_bias = nn.Parameter(torch.empty(heads, bw))

    def params(self) -> tuple[torch.Tensor, ...]:
        """(input gate weight, bias, recurrence gate weight, bias, a_param): this rank's shards under tp."""
        return tuple(local(p) for p in (self.input_gate_weight, self.input_gate_bias, self.recurrent_gate_weight,
                                         self.recurrent_gate_bias, self.recurrent_param))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., W] -> (input gate, recurrence gate) [..., W]: sigmoid of each block's x_h W_h + b_h."""
        return gates_of(x, *self.params()[:4])


def gates_of(x: torch.Tensor, wx: torch.Tensor, bx: torch.Tensor, wa: torch.Tensor, ba: torch.Tensor):
    """x [..., W] -> (sigmoid(x_h wx_h + bx_h), sigmoid(x_h wa_h + ba_h)) [..., W] over the H blocks of W/H
    (weights [H, W/H, W/H], biases [H, W/H])."""
    xb = x.reshape(*x.shape[:-1], *bx.shape)  # [..., H, W/H]
    gx = torch.einsum("...hi,hij->...hj", xb, wx) + bx
    ga = torch.einsum("...hi,hij->...hj", xb, wa) + ba
    return torch.sigmoid(gx).flatten(-2), torch.sigmoid(ga).flatten(-2)


class RecurrentBlock(nn.Module):
    """forward(u [B,T,d], state: ConvLruState | None, pos0) -> [B,T,d]; step(u [B,d], state, pos0) -> [B,d]."""

    def __init__(self, cfg: RgLruConfig, d: int, eps: float, kernels: "Kernels"):
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        W, K = cfg.width, cfg.d_conv
        self.linear_y = nn.Linear(d, W)
        self.linear_x = nn.Linear(d, W)
        self.linear_out = nn.Linear(W, d)
        self.conv_1d = nn.Conv1d(W, W, K, groups=W, padding=K - 1)  # weight [W, 1, K]
        self.rg_lru = RgLru(W, cfg.heads)

    @torch.no_grad()
    def init_weights(self, gen: torch.Generator) -> None:
        """Linears normal(0, 0.02), gate blocks normal with std (W/H)^-1/2, biases zero, the conv uniform in
        +-1/sqrt(K); a_param as transformers' RecurrentGemma initialises it: sigma(Lambda) =
        exp(-softplus(a_param)) = sqrt(u) with u uniform in [0.9^2, 0.999^2]."""
        for lin in (self.linear_y, self.linear_x, self.linear_out):
            init.linear_(lin, gen)
        init.uniform_(self.conv_1d.weight, gen, 1.0 / math.sqrt(self.cfg.d_conv))
        init.zeros_(self.conv_1d.bias)
        lru = self.rg_lru
        std = (self.cfg.width // self.cfg.heads) ** -0.5
        init.normal_(lru.input_gate_weight, gen, std)
        init.normal_(lru.recurrent_gate_weight, gen, std)
        init.zeros_(lru.input_gate_bias)
        init.zeros_(lru.recurrent_gate_bias)
        u = 0.9**2 + 1e-8 + (0.999**2 - 0.9**2) * torch.rand(self.cfg.width, generator=gen, dtype=torch.float64)
        init.assign_(lru.recurrent_param, torch.log(u.pow(-0.5) - 1.0))

    def _core(self, y, x, reset, wx, bx, wa, ba, a_param, state=None):
        """From linear_y's output and the conv output x [B,T,W] to linear_out's input: the activation, the
        gates, the RG-LRU scan and the product -> (h * act(y) [B,T,W], final state [B,W])."""
        gate_x, gate_a = gates_of(x, wx, bx, wa, ba)  # [B, T, W] each
        h, last = self.kernels.rglru_scan(x, gate_x, gate_a, a_param, reset=reset, state=state,
                                          chunk=self.cfg.chunk)  # [B, T, W], [B, W]
        return h * ACT[self.cfg.act](y), last

    def forward(self, u: torch.Tensor, state: ConvLruState | None = None, pos0: int = 0) -> torch.Tensor:
        """Without a cache (training) everything between the conv and linear_out is one `recompute` region:
        autograd keeps linear_y's output and the conv output, and the backward recomputes the activation, the
        gates and the scan."""
        Bsz, T, _ = u.shape
        y = self.linear_y(u)  # [B, T, W]
        x = conv_with_taps(self.kernels, self.linear_x(u), self.conv_1d, None if state is None else state.conv,
                           silu=False)  # [B, T, W]
        reset = (pos0 + torch.arange(T, device=u.device) == 0).expand(Bsz, T)  # [B, T]
        if state is None:
            out = recompute(lambda *a: self._core(*a)[0], y, x, reset, *self.rg_lru.params())  # [B, T, W]
        else:
            out, last = self._core(y, x, reset, *self.rg_lru.params(), state=state.h)
            state.h.copy_(last)
        return self.linear_out(out)

    def step(self, u: torch.Tensor, state: ConvLruState, pos0: int) -> torch.Tensor:
        """One token: u [B,d] -> [B,d], advancing the conv taps and h in place."""
        y = ACT[self.cfg.act](self.linear_y(u))  # [B, W]
        x = conv_step_with_taps(self.kernels, self.linear_x(u), self.conv_1d, state.conv, silu=False)  # [B, W]
        gate_x, gate_a = self.rg_lru.gates(x)
        reset = torch.full((u.shape[0],), pos0 == 0, device=u.device)  # [B]
        h = self.kernels.rglru_step(x, gate_x, gate_a, local(self.rg_lru.recurrent_param), state.h, reset=reset)
        return self.linear_out(h * y)


def cp_forward(module: RecurrentBlock, u: torch.Tensor, cp) -> torch.Tensor:
    """One context-parallel rank's pieces u [p*B, c, d] (folded chunks): the conv continues from the previous
    chunk's K-1 inputs; the RG-LRU h_t = a_t h_{t-1} + b_t runs from zero (each chunk's final state), then from
    the state the earlier chunks carry in (`cp.carry`, with the chunk's total decay prod a_t: the same scan run
    on zero inputs from a state of ones). Only global position 0 resets (the first chunk's first token).

    As in `forward`, autograd keeps linear_y's output and the conv output and nothing of the fp32 gates and
    scans: the zero-start scan (its final state), the total decay and the scan from the carried state with
    the activation and the product are three `recompute` regions; only the ranks' exchange of states
    (`cp.carry`, [B, W] states) runs outside them, so no collective runs in the backward's recomputation.
    (Until then this form kept the gates and the scans' chunk states: +37% over an RG-LRU rank's activations
    at cp = 2.)"""
    cfg = module.cfg
    Bsz, T, _ = u.shape
    y = module.linear_y(u)  # [B, T, W]
    x = cp.causal_conv(module.kernels, module.linear_x(u), module.conv_1d, silu=False)  # [B, T, W]
    reset = cp.positions(Bsz, T, u.device) == 0  # [B, T]: only the sequence's first token resets
    params = module.rg_lru.params()  # gate weights and biases, a_param (this rank's W/t channels under tp)
    scan = module.kernels.rglru_scan

    def final_state(x, reset, wx, bx, wa, ba, a_param):  # the zero-start scan's final state [B, W]
        gate_x, gate_a = gates_of(x, wx, bx, wa, ba)  # [B, T, W] each
        return scan(x, gate_x, gate_a, a_param, reset=reset, state=None, chunk=cfg.chunk)[1]

    def decay_of(x, reset, wx, bx, wa, ba, a_param):  # prod of a_t [B, W]: zero inputs from a state of ones
        gate_x, gate_a = gates_of(x, wx, bx, wa, ba)  # [B, T, W] each
        ones = torch.ones(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)  # [B, W]
        return scan(torch.zeros_like(x), gate_x, gate_a, a_param, reset=reset, state=ones, chunk=cfg.chunk)[1]

    h = recompute(final_state, x, reset, *params)  # [B, W]
    decay = recompute(decay_of, x, reset, *params)  # [B, W]
    start = cp.carry(h, decay)  # [B, W]
    out = recompute(lambda *a: module._core(*a[:-1], state=a[-1])[0], y, x, reset, *params, start)  # [B, T, W]
    return module.linear_out(out)  # [B, T, d]


def tp_plan(cfg: RgLruConfig, tp: int) -> dict:
    """Width split over tp by whole gate blocks: linear_x and linear_y column-wise, the depthwise conv's
    channels, the RG-LRU's a_param and its block-diagonal gates (one block per head) with them, linear_out
    row-wise (one all-reduce). Every channel's recurrence is its own, so nothing else crosses ranks."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if cfg.heads % tp:
        raise TensorParallelUnsupported(f"tp = {tp} must divide the rg_lru's {cfg.heads} gate blocks (heads)")
    return {"linear_x": ColwiseParallel(), "linear_y": ColwiseParallel(), "conv_1d": shard_parameters(0),
            "rg_lru": shard_parameters(0), "linear_out": RowwiseParallel()}


KIND = RuntimeKind(
    name="rg_lru",
    module=RecurrentBlock,
    build=RecurrentBlock,
    new_cache=new_cache,
    ops={"causal_conv1d": ops_conv.causal_conv1d, "conv_step": ops_conv.conv_step,
         "rglru_scan": ops_rglru.rglru_scan, "rglru_step": ops_rglru.rglru_step},
    oracles={"causal_conv1d": ops_conv.causal_conv1d_reference, "rglru_scan": _rglru_oracle},
    state_names=state_names,
    outputs=outputs,
    trace_loops=chunk_loops,
    cp_inference=cp_passed,
    cp_forward=cp_forward,
    tp_plan=tp_plan,
)
