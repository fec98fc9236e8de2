"""Training activations: the bytes one sub-layer stores for its backward pass, per micro-batch.

Notation (per GPU): b = ceil(B/(dp*m)) sequences per micro-batch, s = T/c local tokens (context parallel c),
a = activation bytes (16-bit: 2), t = tensor parallel degree, h = d_model. A tensor is *split* (/t)
when tensor parallelism shards it and *replicated* otherwise; with sequence parallelism (SP) the
replicated ones are split along the sequence too, so everything is /t.

Attention sub-layer (Korthikanti et al. 2022, §4.1, generalised to GQA and Dv):
    replicated   norm input a*sbh, QKV input a*sbh, output dropout mask 1*sbh (dropout only)
    split        q, k, v  a*sb*(H*D + Hkv*D + Hkv*Dv); attention output (o_proj input) a*sb*H*Dv
    core         flash attention: the log-sum-exp, fp32, 4*sb*H (split)
                 eager: softmax output a*H*b*s*T; with dropout also its mask 1*H*b*s*T and output
                 a*H*b*s*T. s*T = local queries x all keys (= s^2 without context parallelism).
  The paper's GPT block (MHA, a=2, dropout, no flash): 13sbh + 5as^2b, with TP 5sbh + 8sbh/t + 5as^2b/t.
MLP sub-layer:
    replicated   norm input a*sbh, MLP input a*sbh, dropout mask 1*sbh (dropout only)
    split        gated (SwiGLU/GeGLU): gate, up, product 3*a*sb*F; otherwise up, activation 2*a*sb*F
  Paper (GELU, F=4h): 21sbh, with TP 5sbh + 16sbh/t. Both together: sbh(34 + 5as/h) and
  sbh(10 + 24/t + 5as/(ht)), the formulas of Korthikanti et al. (2022), Table 2; our default (SwiGLU, GQA, flash, no
  dropout) changes the constants as above.
Mamba-1 sub-layer (state-spaces/mamba `mamba_inner_fn`):
    replicated   norm input, in_proj input a*sbh; x_proj output a*sb*(R + 2N) (twice with Jamba's
                 inner dt/B/C norms, whose inputs are saved too)
    split        xz 2a*sb*Di; conv output a*sb*Di and delta a*sb*Di (recomputed under selective
                 recompute, as checkpoint_lvl=1 does); scan output y and gated output a*sb*Di each;
                 the scan's fp32 chunk states 4*b*Di*2N*ceil(s/2048) (2048-token kernel chunks)
Mamba-2 sub-layer (`mamba_split_conv1d_scan_combined`):
    replicated   norm input, in_proj input a*sbh
    split        zxbcdt a*sb*(2Di + 2GN + Hs); scan output a*sb*Di; conv output a*sb*(Di + 2GN),
                 fp32 dt 4*sb*Hs and the gated-norm output a*sb*Di, the last three recomputed under
                 selective recompute (the fused kernel saves only zxbcdt, the scan output and rstd).
                 SSD chunk states are recomputed in the backward pass: no O(T/C) term.
MoE sub-layer (dropless top-k, perfectly balanced routing so expert parallelism moves tokens but not bytes):
    replicated   norm input, router input a*sbh; router logits and probabilities fp32 8*sb*E;
                 k dispatched copies of the input and k expert outputs (before the weighted sum) 2k*a*sbh
    split        each of the k expert MLPs as the MLP above: k * (3|2) * a*sb*F
Recompute:
    none       everything above
    selective  drops the attention core (eager: the s*T terms), Mamba's conv output and delta, and
               Mamba-2's conv output, dt and norm output: all cheap to recompute
    full       only each checkpoint's input a*sbh (replicated) is stored; a checkpoint is a mixer
               sub-layer together with the FFN that follows it (a GPT layer stores 2sbh, as in the paper).
               One checkpoint's full activations are live again while it back-propagates (the
               "working set", added by the stack assembly).
"""

from __future__ import annotations

import sympy

from ltmdsl.ir import AttentionConfig, Mamba2Config, MambaConfig, MLPConfig, ModelIR, MoEConfig
from ltmdsl.memory.settings import Settings
from ltmdsl.memory.symbols import B, T, per_replica, q

R = sympy.Rational
SCAN_CHUNK = 2048  # state-spaces/mamba selective_scan: tokens per saved fp32 chunk state


class _Ctx:
    """The per-micro-batch quantities every formula shares."""

    def __init__(self, model: ModelIR, s: Settings):
        p = s.parallel
        self.a = s.activation_dtype.bytes
        self.b = per_replica(B, q(p.dp) * p.microbatches)
        self.s = T / R(p.cp)
        self.tok = self.b * self.s
        self.t = R(p.tp)
        self.sp = p.sequence_parallel or p.tp == 1
        self.h = model.d_model
        self.dropout = s.dropout

    def rep(self, x):
        """A tensor tensor-parallelism replicates (split along the sequence under SP)."""
        return x / self.t if self.sp else x

    def split(self, x):
        return x / self.t


def _mlp_inner(activation: str, d_ff: int) -> int:
    return (3 if activation in ("swiglu", "geglu") else 2) * d_ff


def stored(m, model: ModelIR, s: Settings, recompute: str | None = None):
    """Bytes one sub-layer stores for backward, per micro-batch, under `recompute` none|selective.

    Full recompute is handled by `checkpoint` and the working set; pass none or selective here.
    """
    recompute = recompute or s.recompute
    sel = recompute != "none"
    x = _Ctx(model, s)
    a, tok, h = x.a, x.tok, x.h
    base = x.rep(2 * a * tok * h)  # the sub-layer's norm input and the norm output fed to the mixer
    if isinstance(m, AttentionConfig):
        out = base + x.split(a * tok * (m.heads * m.head_dim + m.kv_heads * (m.head_dim + m.v_head_dim)))
        out += x.split(a * tok * m.heads * m.v_head_dim)
        if x.dropout:
            out += x.rep(tok * h)
        if s.flash_attention:
            out += x.split(4 * tok * m.heads)
        elif not sel:
            scores = x.b * x.s * T * m.heads
            out += x.split(a * scores + ((1 + a) * scores if x.dropout else 0))
        return out
    if isinstance(m, MLPConfig):
        out = base + x.split(a * tok * _mlp_inner(m.activation, m.d_ff))
        return out + (x.rep(tok * h) if x.dropout else 0)
    if isinstance(m, MoEConfig):
        return (base + x.rep(8 * tok * m.experts + 2 * m.top_k * a * tok * h)
                + x.split(m.top_k * a * tok * _mlp_inner(m.activation, m.d_ff)))
    if isinstance(m, MambaConfig):
        xdbl = (m.dt_rank + 2 * m.d_state) * (2 if m.inner_norms else 1)
        out = base + a * tok * xdbl + x.split(a * tok * 4 * m.d_inner)
        out += x.split(4 * x.b * m.d_inner * 2 * m.d_state * sympy.ceiling(x.s / SCAN_CHUNK))
        if not sel:
            out += x.split(2 * a * tok * m.d_inner)
        return out
    if isinstance(m, Mamba2Config):
        zxbcdt = 2 * m.d_inner + 2 * m.n_groups * m.d_state + m.heads
        out = base + x.split(a * tok * (zxbcdt + m.d_inner))
        if not sel:
            out += x.split(a * tok * (m.conv_dim + m.d_inner) + 4 * tok * m.heads)
        return out
    raise TypeError(f"unknown mixer {type(m).__name__}")


def checkpoint(model: ModelIR, s: Settings):
    """Full recompute: the stored input of one checkpoint, a*sbh (replicated; /t under SP)."""
    x = _Ctx(model, s)
    return x.rep(x.a * x.tok * x.h)


def korthikanti_per_layer(s_len: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                          selective: bool = False) -> sympy.Rational:
    """The paper's closed forms (bytes per transformer layer), for cross-checking `stored`.

    sbh(10 + 24/t + 5as/(ht)) with TP, sbh(34/t + 5as/(ht)) with TP+SP; selective recompute drops the
    5as/(ht) term.
    """
    sbh = s_len * b * h
    core = 0 if selective else R(5 * a * s_len, h * t)
    return sbh * ((R(34, t) if sp else 10 + R(24, t)) + core)
