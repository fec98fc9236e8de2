"""MiniMax-01's lightning attention (MiniMax 2025, "MiniMax-01: Scaling Foundation Models with Lightning
Attention"; transformers' MiniMaxLightningAttention): its IR config and every pure facet.

The layer (H heads of dim D, value dim Dv = D; act = SiLU in MiniMax-01):
    q, k, v = act(qkv_proj(u)).split per head           qkv_proj: d -> 3HD (per head [q | k | v])
    S_t = exp(-s_h) S_{t-1} + k_t v_t^T,  o_t = q_t S_t  decayed linear attention, S [B, H, D, Dv]
    o = RMSNorm_HD(o) * sigmoid(output_gate(u))          norm over all H*D channels (eps `norm_eps`)
    out = out_proj(o)                                     out_proj: HD -> d
The per-head slope s_h = 2^(-8(h+1)/H) (the ALiBi geometric sequence, Press et al. 2022), times
(1 - l/(L-1+1e-5) + 1e-5) with `depth_decay` for the layer's place l among the L sequence mixers of the
stack (MiniMax's layer_idx of num_hidden_layers: one mixer per decoder layer). The place is read by the
runtime from the IR's stack order, so the config itself is position-free and shared by every use.

Parameters: 3dHD + HD d + (gate) d HD + HD (the norm weight); the slopes are not learned.
Recurrent state per sub-layer on one GPU (b = ceil(B/dp), constant in T): b * H/t * D * Dv * 4, in fp32
whatever the budget's state_dtype (a wider one is kept): with a decay exp(-s) close to 1, S holds about
1/s tokens' updates, so one token adds about s|S|, which is below bf16's relative precision (2^-8) for
s < 2^-8 (MiniMax-01's slopes go down to 2^-8 times a depth factor near 1e-5): a state rounded to bf16
after every token drops those updates, and the error grows with the tokens decoded. vLLM keeps MiniMax-01's
linear-attention state in fp32 for the same reason.
Prefill workspace: the largest moment of the runtime's forward (runtime/kinds/lightning.py,
runtime/ops_lightning.py) over a chunk of Cc = min(C, T) tokens, n = b*Cc/c on one GPU, blocks of
L = min(chunk, Cc/c), h = H/t, S = 4b*h*D*Dv one fp32 state, m = 1 when an earlier block left its state:
    qkv      6a*n*HD/t                              the projection and its activation
    rule     4a*n*HD/t + one block's fp32 working set (q, k, v and the output o beside it):
                 scores  m*S + 12b*L*h*D + 8b*h*L^2 + M      q k^T and its masked product
                 end     (2+m)*S + 12b*L*h*D + 8b*h*L*D + 8h*L + M   k*decay, the block's o, the next state
             with the block's fp32 q, k, v (12b*L*h*D) and M = 4h*L^2 + 4L^2 + 4L + 4h (the decay mask,
             distances, positions, slopes)
    norm     (a + 8)*n*HD/t (3a when a >= 4): o and the RMSNorm's fp32 copy and its square
    gate     4a*n*HD/t: o, its norm, the gate's projection and sigmoid
    out      a*n*(2HD/t + d): o, the gated norm and out_proj's output
Training activations per micro-batch (the block form, ops_recurrence.ChunkedRecurrence, saves q, k, v and
the slopes only; its backward recomputes the block states and each block's terms):
    replicated  what the pre-norm keeps and its output (MicroBatch.base), the norm's rstd 4*sb
    split       qkv pre-activation and activation 6a*sb*HD, the norm's fp32 input copy max(4, a)*sb*HD, its
                normalised value and output 2a*sb*HD, sigmoid(gate) a*sb*HD and out_proj's input a*sb*HD
the same under selective recompute (the block form's internals are already recomputed). Context parallel
(c > 1, the runtime's cp_forward): the state entering each of the rank's p pieces (p = 2 under the balanced
split, 1 contiguous), 4*b*p*H'*D*D (fp32), is the block form's input, and the composition over the chunks
keeps every chunk's gathered decay exp(-s_h * tokens), 4*b*n*H' (n = 2c or c chunks); the states entering the
chunks are not kept (the decays depend on no parameter). Until this convention neither was counted: +1.5% over
a Lightning rank's activations at cp = 2.
FLOPs beyond the projections: a step costs 5HDDv (decay, outer product and add; read-out 2HDDv); prefill
in blocks of L = min(chunk, T) costs per token 2L H (D + Dv) (the full L x L block products) + 4HDDv
(inter-block read-out and the block contribution), plus 2HDDv per block for the carried state.
Backward (the `backward` facet): the gradients of q, k and v, 3a*tok*HD/t, beside the output norm's fp32
gradient and its input's fp32 copy, 8*tok*HD/t; the block form's recomputed chunk is below these (traced at
chunk 16 and 32 alike).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    CacheTerm, Flops, Kind, ModelContext, Param, Split, divide, no_context_limit, none_inactive, none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica
from ltmdsl.units import DTYPES

R = sympy.Rational
ACTIVATIONS = ("silu", "gelu", "relu")


@dataclass(frozen=True)
class LightningConfig(LayerConfig):
    """Lightning attention (MiniMax-01): H heads of dim D (value dim D), decay slopes per head (and by
    depth with `depth_decay`), RMSNorm over H*D with eps `norm_eps`, sigmoid output gate with `gate`."""

    heads: int  # H
    head_dim: int  # D (= Dv)
    act: str
    chunk: int  # the block length of the parallel form
    gate: bool
    norm_eps: float
    depth_decay: bool
    kind: str = field(default="lightning", init=False)

    @property
    def inner(self) -> int:
        """H * D, the width of q, k, v, the output and the gate."""
        return self.heads * self.head_dim


def build(v: dict[str, Any], ctx: ModelContext) -> LightningConfig:
    heads = v["heads"]
    head_dim = v["head_dim"] if v["head_dim"] is not None else divide(
        ctx.d_model, heads, "the head dim d_model / heads", "heads")
    return LightningConfig(heads=heads, head_dim=head_dim, act=v["act"], chunk=v["chunk"], gate=v["gate"],
                           norm_eps=v["norm_eps"], depth_decay=v["depth_decay"])


def count(c: LightningConfig, d: int) -> int:
    hd = c.inner
    return d * 3 * hd + hd * d + (d * hd if c.gate else 0) + hd


def split(c: LightningConfig, d: int) -> Split:
    """Heads split over tp (each head's state is indivisible)."""
    return Split(tp=(("lightning heads", c.heads),))


def state_dtype(requested):
    """The state's dtype: fp32, or the requested state dtype where it is wider (module docstring)."""
    return requested if requested.bytes >= 4 else DTYPES["fp32"]


def cache(c: LightningConfig, s) -> tuple[CacheTerm, ...]:
    b = per_replica(B, s.dp)
    dt = state_dtype(s.state_dtype)
    return (CacheTerm("recurrent_state", None, dt, b * R(c.heads, s.tp) * c.head_dim * c.head_dim * dt.bytes),)


def workspace(c: LightningConfig, d: int, s):
    """Prefill workspace of one chunk of Cc tokens: the largest of the layer's moments (module docstring)."""
    b = per_replica(B, s.dp)
    cc = Smallest(C, T) / R(s.cp)  # tokens per sequence
    n = b * cc
    cw = Smallest(c.chunk, cc)  # the block length
    h, t, hd = R(c.heads, s.tp), R(s.tp), c.inner
    D = c.head_dim
    a = s.activation_dtype.bytes
    S = 4 * b * h * D * D  # one fp32 state
    copies = 4 * b * cw * h * 3 * D  # one block's q, k, v in fp32
    common = 4 * h * cw**2 + 4 * cw**2 + 4 * cw + 4 * h  # the decay mask [H, L, L], distances, positions, slopes
    multi = Smallest(1, sympy.ceiling(cc / c.chunk) - 1)  # 1 when an earlier block left its state
    scores = multi * S + copies + common + 8 * b * h * cw**2  # q k^T and its masked product
    end = (2 + multi) * S + copies + common + 4 * b * h * cw * 2 * D + 8 * h * cw  # k * decay, the block's o
    qkv = a * n * 6 * hd / t  # the projection and its activation
    rule = a * n * 4 * hd / t + Largest(scores, end)  # q, k, v and o beside one block's working set
    norm = (a + 8 if a < 4 else 3 * a) * n * hd / t  # o and the norm's fp32 copies
    gate = a * n * 4 * hd / t if c.gate else 0  # o, its norm, the gate's projection and sigmoid
    out = a * n * (2 * hd / t + d)  # o, the gated norm and out_proj's output
    return Largest(qkv, rule, norm, gate, out)


def stored(c: LightningConfig, x, selective: bool):
    """Training activations per micro-batch (module docstring); the same under selective recompute, as the
    block form already recomputes its internals."""
    f = max(4, x.a)  # the norm's fp32 copy of its input (the input itself when fp32 already)
    out = x.base + x.split(x.a * x.tok * 10 * c.inner + f * x.tok * c.inner) + 4 * x.tok
    if x.c > 1:  # context parallel: the pieces' entering states and the gathered decays (module docstring)
        out += 4 * x.b * x.split(c.heads) * (x.pieces * c.head_dim * c.head_dim + x.chunks)
    return out


def step_flops(c: LightningConfig) -> int:
    """One recurrent step: 3HDDv to decay the state and add k v^T, 2HDDv to read it out."""
    return 5 * c.heads * c.head_dim * c.head_dim


def flops(c: LightningConfig) -> dict[str, Flops]:
    H, D = c.heads, c.head_dim
    L = Smallest(c.chunk, T)
    prefill = (2 * L * H * 2 * D + 4 * H * D * D) * T + 2 * H * D * D * sympy.ceiling(T / L)
    return {"ssm": Flops(sympy.Integer(step_flops(c)), prefill)}


def dims(c: LightningConfig) -> str:
    extras = [c.act] + (["gate"] if c.gate else []) + (["depth-decay"] if c.depth_decay else [])
    return f"H={c.heads} D={c.head_dim} C={c.chunk} " + " ".join(extras)


def backward(c: LightningConfig, x):
    """The backward's peak beyond `stored` and the output's gradient (module docstring): the gradients of q, k
    and v, 3a*tok*inner, beside the output norm's fp32 gradient and its input's fp32 copy, 8*tok*inner."""
    return x.split((3 * x.a + 8) * x.tok * c.inner)


KIND = Kind(
    name="lightning",
    doc="MiniMax-01's lightning attention: decayed linear attention with an output norm and gate.",
    config=LightningConfig,
    params=(
        Param("heads", "int", required=True, min=1, doc="heads H"),
        Param("head_dim", "int", nullable=True, min=1, doc="head dim D (default d_model / heads)"),
        Param("act", "enum", "silu", choices=ACTIVATIONS, doc="activation of the qkv projection"),
        Param("chunk", "int", 256, min=1, doc="block length of the parallel form (MiniMax's block_size)"),
        Param("gate", "bool", True, doc="sigmoid output gate"),
        Param("norm_eps", "float", 1e-6, min=0, doc="eps of the output RMSNorm"),
        Param("depth_decay", "bool", True, doc="scale the slopes by the layer's depth, as MiniMax-01"),
    ),
    is_ffn=False,
    build=build,
    count=count,
    inactive=none_inactive,
    split=split,
    context_check=no_context_limit,
    cache=cache,
    workspace=workspace,
    stored=stored,
    backward=backward,
    flops=flops,
    dims=dims,
    per_use=none_per_use,
)
