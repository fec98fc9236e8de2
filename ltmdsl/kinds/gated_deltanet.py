"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025), as Qwen3-Next has it: its IR config and every pure facet.

The layer (transformers' Qwen3NextGatedDeltaNet), with Hk key heads of dim Dk and Hv value heads of dim Dv:
    in_proj_qkvz: d -> 2*Hk*Dk + 2*Hv*Dv (q, k, v, the output gate z)   in_proj_ba: d -> 2*Hv (beta, decay)
    a depthwise causal conv of K taps (silu) over the conv_dim = 2*Hk*Dk + Hv*Dv channels of q, k, v
    g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b); o = gated delta rule (q, k L2-normalised)
    y = norm.weight * rmsnorm(o) * silu(z) over each value head's Dv; out_proj: Hv*Dv -> d
Parameters: d*(2*Hk*Dk + 2*Hv*Dv) + d*2*Hv + conv_dim*K (+ conv_dim with conv_bias) + 2*Hv + Dv + Hv*Dv*d.

Recurrent state per sub-layer on one GPU (b = ceil(B/dp), state dtype s_bytes, constant in T):
    conv   b * conv_dim/t * taps * s_bytes           delta  b * Hv/t * Dk * Dv * s_bytes
  taps = K ("full") or K - 1 ("minus_one"), the budget's conv_taps convention; tp splits whole key heads
  (and with them their Hv/Hk value heads), so tp must divide Hk.
Prefill workspace: what the runtime (runtime/kinds/gated_deltanet.py, runtime/ops_delta.py) holds at the
largest moment of the layer's forward over a chunk of Cc = min(C, T) tokens, n = b * Cc/c of them on one GPU
(a activation bytes, s_b state bytes, D = conv_dim, Cw = min(L, Cc/c) the rule's chunk, every width /t):
    conv     a*n*(4D + beside) + a*b*(K-1)*D      the conv's input, its input after the K-1 cached taps, its
                                                   output and silu(output), beside what the layer keeps
                                                   meanwhile (beside: z, b, a = Hv*Dv + 2Hv; KDA: nothing)
    taps     a*n*(2D + beside) + s_b*D*(b*taps + n)  (+ s_b*n*D when s_b != a, the cast input): the cache's
                                                   taps updated from [taps ; input]
    rule     a*n*(D + beside + Hv*Dv) + 4*n*Hv*(decay + 1) + one chunk's fp32 working set:
                 (2 + m)*S + S' + 5*Xk + 3*Xv + 2*Q + G + Cw^2
             q, k, v (the conv output), the rule output o, fp32 g and beta; S = 4b*Hv*Dk*Dv a state (the one
             carried in when m = 1, i.e. an earlier chunk ran, the next one and k_out^T d), S' another when the
             cache is not fp32 (its fp32 copy), Xk = 4b*Hv*Cw*Dk (q and k per value head, [U | W]'s W, q_in,
             k_out), Xv = 4b*Hv*Cw*Dv (U, the corrections d, the chunk's output), Q = 4b*Hv*Cw^2 (the k.k and
             q.k scores), G = 4b*Hv*Cw*decay (the cumulative log-decay) and the causal mask; KDA's per-channel
             decay also peaks at a diagonal block of its scores: m*S + S' + 4Xk + Xv + 2Q + G + 3E + 2E/Dk +
             5Cw^2 with E = 4b*Hv*min(16, Cw)^2*Dk (runtime/ops_delta.py `_decayed_scores_per_channel`)
    finish   a*n*3*Hv*Dv + max(4b*Cw*Hv*(3Dv + 1), a*n*d): z, o and the gated norm's output beside one norm
             block's fp32 temporaries or out_proj's output
and the workspace is the largest of them (KDA adds the forget gate's moment). The projections (at most
a*n*(3D + Hv*Dv + 2Hv)) and the decode step never exceed the conv's moment. Exact when Cc/c is a multiple
of L; the last, shorter chunk of another length is counted as a full one.
Training activations, per micro-batch: the rule (ops_recurrence.ChunkedRecurrence) saves q, k, v, g, beta
and nothing it computes; the gated norm (ops_norm_gate.NormThenGate) saves o, the gate and rstd, as
flash-linear-attention's fused kernels do. So:
    replicated  what the pre-norm keeps and its output (MicroBatch.base)
    split       the conv's padded input a*b*(s + K - 1)*D, its output and silu(output) 2a*sb*D, the rule
                output o, the gate z and the norm output 3a*sb*Hv*Dv, and in fp32 rstd, beta, g and
                softplus's input and output 4*sb*Hv*(2 + 3*decay) (decay = 1; KDA: Dk)
the same under selective recompute (the rule's internals are already recomputed). Context parallel (c > 1,
the runtime's cp_forward, shared with KDA; Hv' = Hv/t): the rank's p pieces (p = 2 under the balanced split,
1 contiguous) each pad the conv's input with their own K - 1 halo, a*b*D*(p - 1)*(K - 1) more; the state
entering each piece, 4*b*p*Hv'*Dk*Dv (fp32), is the rule's input; the two runs that summarise each chunk (its
own state H and transition M) are recompute regions over the rule's inputs and keep nothing more; and the
composition S <- M_j S + H_j over the chunks before the rank's last one (the last rank's last chunk is c
balanced, c - 1 contiguous) keeps, for each, the matrix product's inputs: the state S and a contiguous copy of
the gathered M_j, 4*b*Hv'*Dk*(Dv + Dk); with one sequence a rank (b = 1) M_j is a contiguous view already, and
the products keep the gathered M whole instead, 4*Hv'*Dk^2 for each of the n = 2c (or c) chunks (until this
convention counted as copies: Gated DeltaNet's cp 2 rank at 2 heads of 32, b = 1, +4.7% over its predicted
activations). Until the convention before, the form kept M's zero values too, and none of it was counted:
+8.4% over a Gated DeltaNet rank's activations at cp = 2, +6.5% KDA's. The backward recomputes
the chunk states, about 2*sqrt(s/L) fp32 states at a time, one layer at a time (the `backward` facet below).
FLOPs per value head: a recurrent step decays S (Dk*Dv), reads S^T k (2 Dk*Dv), writes k d^T (2 Dk*Dv) and
reads out S^T q (2 Dk*Dv): 7*Dk*Dv, plus 2*conv_dim*K for the conv. Prefill in chunks of L = min(chunk, T),
per token and value head: the k.k and q.k scores 4*L*Dk, the triangular solve for [U | W] L*(Dk + Dv), the
intra-chunk read-out 2*L*Dv, and the state products W S, (q*decay) S and the state update 6*Dk*Dv.
Backward (the `backward` facet, `delta_backward`: what one sub-layer's backward holds at its peak beyond `stored`
and its output's gradient; Hv' = Hv/t, Hk' = Hk/t; under cp the rank's p pieces are rows of the batch, r = b*p rows
of s/p tokens (b rows of s tokens put a KDA cp rank's traced peak 36% above the prediction), L = min(chunk, s/p),
n = ceil(s/(p*chunk)) chunks a row; one chunk's fp32 scores Q = 4*r*Hv'*L^2, keys Xk = 4*r*Hv'*L*Dk and values
Xv = 4*r*Hv'*L*Dv per value head, one fp32 state S = 4*r*Hv'*Dk*Dv, V = a*tok*Hv'*Dv):
    Gated DeltaNet  `scalar_decay_backward`, from ChunkedRecurrence's backward (runtime/ops_recurrence.py) and the
                    chunk step (runtime/ops_delta.py `_chunk_step`), read per tensor off the trace's peak at 2 key
                    heads of 16 and 4 value heads of 24, chunk 16 and 32 (one process, and cp 2 with b = 2):
        held    the rule's zeroed input gradients, q, k, v a*tok*D/t and g, beta in fp32 8*tok*Hv'; o's and the
                gate's gradients (the gated norm's backward) 2V, less o, the gate, the norm output and rstd,
                3V + 4*tok*Hv' counted in `stored` and freed once the norm and out_proj back-propagated
        chunk   the chunk re-run and back-propagating, at its read-out's gradient: the decay matrix, the stacked
                (k, q).k products and their decayed copy, the masked lower triangle, I + L and the scores' gradient
                8Q; q and k per value head, their stacked pair and its transposed copy, W of [U | W], beta*k,
                q*decay (or, over more than one row, its contiguous copy) and its gradient 10Xk; q and k cast to
                fp32 per key head 2*4*r*L*Hk'*Dk; v in fp32, U, the corrections, the output, its fp32 gradient
                and two of the read-out's gradients 7Xv, and over more than one row (r > 1) the output
                gradient's contiguous copy Xv (the transposed [r, L, Hv', Dv] layout)
        states  the start states ChunkedRecurrence's backward keeps, one every e = ceil(sqrt(n)) chunks (m =
                ceil(n/e) of them), while it recomputes a segment's e starts, with the state gradient carried
                from the chunk after: m - 1 + e states at most (one fewer when the first is the rule's input,
                counted in `stored`); the final state's gradient, the chunk's end state and the state gradient
                being summed 3S
                    Under cp the peak is in the summary regions (runtime/kinds/gated_deltanet.py
                `carried_delta_state`), which back-propagate after the rule and the composition: the own-state
                region holds the rule's input gradients twice (its own, zeroed, beside the rule's, waiting to be
                summed with them), the zero gradient of its unused output o in place of o's, a chunk and states
                as above and its output H, S; the transition region its own gradients of q, k, g and beta, M's
                zero values and their output's zero gradient 2*a*tok*Hv'*Dk, a chunk and states of values of
                width Dk (S' = 4*r*Hv'*Dk^2, its start the given identity) and its output M, S'; both less what
                the rule's start and the composition keep (`composition_kept`, counted in `stored`), freed by
                then; the larger of the two.
                    Traced at 2 heads of 32 (chunk 16, 32 and 64, context 256) and at 2 key heads of 24 with 4
                value heads of 16 (chunk 32, context 128, b = 2), one process, cp 2 and tp 2 x cp 2 x sp, under
                every recompute policy: the traced peak -2.9% to +0.4% of the per-GPU total (on one process the
                prediction is over by the final norm's kept tensors, freed before the stack back-propagates, less
                the stream's gradient, a convention every kind shares). Until this convention the chunk term was
                counted on the traced backward, 2Xk + 2Xv + 12Q with (4 + 2*ceil(sqrt(n)))*S of states and the
                input gradients twice under cp, and nothing freed: a cp 2 rank's peak +15.3% over the per-GPU
                total (Dk 24, Dv 16, b = 2; +17.2% with full recompute), +6.6% at 2 heads of 32 and chunk 64.
    KDA             the gradients of the rule's inputs, q, k, v (the conv output) a*tok*D/t and the fp32 g and
                    beta 4*tok*Hv'*(Dk + 1), twice under cp (the summary regions, own state and transition, re-run
                    their rule and back-propagate it while the main rule's input gradients wait to be summed with
                    theirs); ChunkedRecurrence's backward keeps one start state every ceil(sqrt(n)) chunks and
                    recomputes a segment's starts, with the state gradient and a chunk's own states about
                    (4 + 2*ceil(sqrt(n)))*S; then one chunk re-run under autograd and differentiated, derived from
                    the chunk step (runtime/ops_delta.py `_chunk_step`, per-channel decay by diagonal blocks of 16
                    rows, nb = ceil(L/16) of them, E = 4*b*Hv'*min(16, L)^2*Dk one block's decay), the larger of
                    two moments:
        start  the whole re-run graph with its first gradients: every block's decay and its (k, q) x k product,
               3*nb*E; the stacked scores, the mask-filled lower triangle and I + L, and the scores' gradient 5Q;
               q and k cast, their repeat copies, the stacked pair, the decayed keys, exp(gamma) and its uses,
               13Xk; v, the UT transform's [U | W], the corrections, the output and its fp32 gradient 7Xv; the
               blocks below the diagonal (each block's decayed rows for the stacked pair and their exp, its
               decayed columns copied for the matmul and their exp) 3*4*b*Hv'*16*Dk*((nb - 1) + nb*(nb - 1)/2)
        block  a diagonal block's einsum back-propagating: every block's decay nb*E, the products of the blocks
               not yet back-propagated 2*(nb - 1)*E, the einsum's gradients (the product's, the decay's before and
               after the sum over the pair, the matmul's) 7E, with 2Q + 12Xk + 2Xv of the graph still held
               plus the rule output's gradient and o_proj's input gradient 2a*tok*Hv'*Dv, less what the gated norm
               and o_proj kept (o, the gate, the norm output, rstd: 3a*tok*Hv'*Dv + 4*tok*Hv'), freed as they
               back-propagated before the rule. Read per tensor off the trace's peak at 4 heads of 16, chunk 16,
               32 and 64; traced within 4% (one process, cp 2, tp 2 x cp 2 x sp). Until this convention its chunk
               term was the Gated DeltaNet count plus a fitted 6E (10% low at chunk 32 on one process, +12.3%
               over a cp 2 rank's peak at the README's shape, +14.9% at chunk 32 and context 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig
from ltmdsl.kinds.base import (
    CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split, conv_taps, no_context_limit, none_inactive,
    none_per_use,
)
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

SUB = 16  # row block of the per-channel decay's exact [SUB, SUB, Dk] tensors (runtime/ops_delta.py)

R = sympy.Rational


@dataclass(frozen=True)
class GatedDeltaNetConfig(LayerConfig):
    """Gated DeltaNet layer as transformers' Qwen3NextGatedDeltaNet computes it (module docstring).

    Each key head serves Hv / Hk consecutive value heads (grouped value attention); the output gate and
    gated RMSNorm over each value head are always present, as in Qwen3-Next.
    """

    key_heads: int  # Hk
    value_heads: int  # Hv
    head_dim: int  # Dk
    v_head_dim: int  # Dv
    d_conv: int  # K
    conv_bias: bool
    chunk: int  # L, the chunk of the WY form
    kind: str = field(default="gated_deltanet", init=False)

    @property
    def key_dim(self) -> int:
        """Hk * Dk, the width of q and of k."""
        return self.key_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        """Hv * Dv, the width of v, z and the rule output."""
        return self.value_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels that pass through the causal conv: q, k and v."""
        return 2 * self.key_dim + self.value_dim


def check_chunk(chunk: int) -> None:
    """The chunk of the WY form must be a power of two (the generated kernels tile by it)."""
    if chunk & (chunk - 1):
        raise CheckError(f"chunk must be a power of two, got {chunk}", "chunk")


def build(v: dict[str, Any], ctx: ModelContext) -> GatedDeltaNetConfig:
    key_heads = v["key_heads"]
    value_heads = v["value_heads"] if v["value_heads"] is not None else key_heads
    if value_heads % key_heads:
        raise CheckError(f"value_heads ({value_heads}) must be a multiple of key_heads ({key_heads}): each key head "
                         "serves the same number of value heads", "value_heads")
    check_chunk(v["chunk"])
    head_dim = v["head_dim"]
    return GatedDeltaNetConfig(
        key_heads=key_heads, value_heads=value_heads, head_dim=head_dim,
        v_head_dim=v["v_head_dim"] if v["v_head_dim"] is not None else head_dim, d_conv=v["d_conv"],
        conv_bias=v["conv_bias"], chunk=v["chunk"],
    )


def count(c: GatedDeltaNetConfig, d: int) -> int:
    in_proj = d * (2 * c.key_dim + 2 * c.value_dim) + d * 2 * c.value_heads  # in_proj_qkvz, in_proj_ba
    conv = c.conv_dim * c.d_conv + (c.conv_dim if c.conv_bias else 0)
    return in_proj + conv + 2 * c.value_heads + c.v_head_dim + c.value_dim * d  # dt_bias, A_log, norm, out_proj


def split(c: GatedDeltaNetConfig, d: int) -> Split:
    """Tensor parallelism splits whole key heads (each with its value heads); the output norm's weight,
    shared by every head, is replicated."""
    return Split(tp=(("key heads", c.key_heads),), replicated=c.v_head_dim)


# ---- memory and compute (shared with KDA, ltmdsl/kinds/kda.py) ------------------------------------


def delta_cache(conv_dim: int, d_conv: int, heads: int, dk: int, dv: int, s) -> tuple[CacheTerm, ...]:
    """Conv taps [b, conv_dim/t, taps] and the delta-rule state [b, Hv/t, Dk, Dv], in the state dtype."""
    b = per_replica(B, s.dp)
    sb = s.state_dtype.bytes
    conv = b * R(conv_dim, s.tp) * conv_taps(d_conv, s.conv_taps) * sb
    return (CacheTerm("recurrent_state", "conv", s.state_dtype, conv),
            CacheTerm("recurrent_state", "delta", s.state_dtype, b * R(heads, s.tp) * dk * dv * sb))


@dataclass(frozen=True)
class DeltaShape:
    """The widths the memory facets of the two delta-rule kinds share (module docstring).

    `beside_conv` is the activation-dtype elements per token a layer keeps beside the conv while the conv
    runs (Gated DeltaNet: z, b, a, that is Hv*Dv + 2*Hv; KDA: none); `per_channel` is KDA's decay.
    """

    conv_dim: int
    d_conv: int
    heads: int  # Hv
    dk: int
    dv: int
    chunk: int
    per_channel: bool
    beside_conv: int

    @property
    def decay(self) -> int:
        """Log-decays per head and token: 1, or Dk per channel."""
        return self.dk if self.per_channel else 1


def rule_chunk_workspace(c: DeltaShape, b, heads, cw, copy, multi):
    """fp32 working set of one chunk of cw tokens of the rule, for b sequences and `heads` local value heads;
    `copy` is S when the start state is an fp32 copy of a cache in another dtype, `multi` 1 when a chunk
    before this one left its state (module docstring)."""
    S = 4 * b * heads * c.dk * c.dv
    Xk, Xv = 4 * b * heads * cw * c.dk, 4 * b * heads * cw * c.dv
    Q, G = 4 * b * heads * cw**2, 4 * b * heads * cw * c.decay
    end = (2 + multi) * S + copy + 5 * Xk + 3 * Xv + 2 * Q + G + cw**2
    if not c.per_channel:
        return end
    E = 4 * b * heads * Smallest(SUB, cw) ** 2 * c.dk
    return Largest(end, multi * S + copy + 4 * Xk + Xv + 2 * Q + G + 3 * E + 2 * E / c.dk + 5 * cw**2)


def delta_workspace(c: DeltaShape, s, finish, extra=()):
    """Prefill workspace of one chunk of Cc tokens (module docstring): the largest of the conv, the taps update,
    the rule and the `finish` moments (and any `extra` ones the kind adds), each a function of (n, a)."""
    b = per_replica(B, s.dp)
    n = b * Smallest(C, T) / R(s.cp)  # b * Cc / c tokens
    t = R(s.tp)
    a, sb = s.activation_dtype.bytes, s.state_dtype.bytes
    D = c.conv_dim
    conv = (a * n * (4 * D + c.beside_conv) + a * b * (c.d_conv - 1) * D) / t
    taps = conv_taps(c.d_conv, s.conv_taps)
    cast = sb * n * D if s.state_dtype.name != s.activation_dtype.name else 0
    update = (a * n * (2 * D + c.beside_conv) + cast + sb * D * (b * taps + n)) / t if taps else 0
    n_cc = n / b  # Cc / c tokens per sequence
    cw = Smallest(c.chunk, n_cc)
    copy = 4 * b * R(c.heads, s.tp) * c.dk * c.dv if sb != 4 else 0
    rule = ((a * n * (D + c.beside_conv + c.heads * c.dv) + 4 * n * c.heads * (c.decay + 1)) / t
            + rule_chunk_workspace(c, b, R(c.heads, s.tp), cw, copy, Smallest(1, sympy.ceiling(n_cc / c.chunk) - 1)))
    return Largest(conv, update, rule, finish(n, a, b, cw), *extra)


def norm_gate_block(c: DeltaShape, b, cw, t):
    """The gated norm's fp32 temporaries for one block of cw tokens: the input copy, the gate copy, act(gate)
    and rstd."""
    return 4 * b * cw * c.heads * (3 * c.dv + 1) / t


def composition_kept(c: DeltaShape, x):
    """Under cp, what the rule's start and the composition S <- M_j S + H_j keep (module docstring): the state
    entering each piece and, for each chunk composed before the rank's last one, the state and M_j contiguous,
    whose product keeps a view of the whole gathered M instead when b = 1 (M_j is contiguous then)."""
    whole = 1 - Smallest(1, x.b - 1)  # 1 when b = 1
    kept_m = x.last_chunk + (x.chunks - x.last_chunk) * whole  # M_j [b, Hv', Dk, Dk] the products keep
    return 4 * x.b * x.split(c.heads) * c.dk * (c.dv * (x.pieces + x.last_chunk) + c.dk * kept_m)


def delta_stored(c: DeltaShape, x):
    """Training activations per micro-batch, shared by both kinds (module docstring); the same under selective
    recompute, as the rule already recomputes its internals."""
    a, tok, D = x.a, x.tok, c.conv_dim
    conv = a * tok * 2 * D + a * x.b * (x.s + c.d_conv - 1) * D  # silu input and output, the padded conv input
    kept = a * tok * 3 * c.heads * c.dv  # the rule output o, the gate, the norm output (out_proj's input)
    fp32 = 4 * tok * c.heads * (2 + 3 * c.decay)  # rstd, beta, g and softplus's input and output
    out = x.base + x.split(conv + kept + fp32)
    if x.c > 1:  # context parallel: the pieces' halos, their entering states, the composition's (docstring)
        out += x.split(a * x.b * D * (x.pieces - 1) * (c.d_conv - 1))
        out += composition_kept(c, x)
    return out


def delta_flops(conv_dim: int, d_conv: int, heads: int, dk: int, dv: int, chunk: int) -> dict[str, Flops]:
    """The delta rule and the conv beyond the projections, in the "ssm" (recurrent mixer) component."""
    step = 7 * heads * dk * dv + 2 * conv_dim * d_conv
    L = Smallest(chunk, T)
    per_tok = heads * (4 * L * dk + L * (dk + dv) + 2 * L * dv + 6 * dk * dv) + 2 * conv_dim * d_conv
    return {"ssm": Flops(sympy.Integer(step), per_tok * T)}


def shape(c: GatedDeltaNetConfig) -> DeltaShape:
    """The shared widths; z, b and a are alive beside the conv."""
    return DeltaShape(c.conv_dim, c.d_conv, c.value_heads, c.head_dim, c.v_head_dim, c.chunk, False,
                      c.value_dim + 2 * c.value_heads)


def cache(c: GatedDeltaNetConfig, s) -> tuple[CacheTerm, ...]:
    return delta_cache(c.conv_dim, c.d_conv, c.value_heads, c.head_dim, c.v_head_dim, s)


def workspace(c: GatedDeltaNetConfig, d: int, s):
    sh, t, vd = shape(c), R(s.tp), c.value_dim

    def finish(n, a, b, cw):
        """z, o and the gated norm's output, with one norm block's temporaries or out_proj's output."""
        return a * n * 3 * vd / t + Largest(norm_gate_block(sh, b, cw, t), a * n * d)

    return delta_workspace(sh, s, finish)


def stored(c: GatedDeltaNetConfig, x, selective: bool):
    return delta_stored(shape(c), x)


def flops(c: GatedDeltaNetConfig) -> dict[str, Flops]:
    return delta_flops(c.conv_dim, c.d_conv, c.value_heads, c.head_dim, c.v_head_dim, c.chunk)


def dims(c: GatedDeltaNetConfig) -> str:
    return (f"Hk={c.key_heads} Hv={c.value_heads} Dk={c.head_dim} Dv={c.v_head_dim} K={c.d_conv} "
            f"C={c.chunk}")


def scalar_decay_backward(c: DeltaShape, x):
    """Gated DeltaNet's backward peak beyond `stored` and the output's gradient (module docstring): the rule's
    backward on one process, and under cp the larger of the two summary regions' (own state, transition)."""
    a, tok, h = x.a, x.tok, x.split(c.heads)
    rows, piece = x.b * x.pieces, x.s / x.pieces  # under cp the rank's pieces are folded into the batch
    L = Smallest(c.chunk, piece)
    n = sympy.ceiling(piece / c.chunk)  # chunks of a row
    every = sympy.ceiling(sympy.sqrt(n))  # ChunkedRecurrence's segments of ceil(sqrt(n)) chunks
    segments = sympy.ceiling(n / every)
    key_width = (c.conv_dim - c.heads * c.dv) // 2  # Hk*Dk, the width of q and of k
    Q, Xk, Xq = 4 * rows * h * L**2, 4 * rows * h * L * c.dk, 4 * rows * L * x.split(key_width)
    wide = Smallest(1, rows - 1)  # over more than one row a transposed chunk tensor is copied for its matmul
    value = x.split(a * tok * c.heads * c.dv)  # one [tok, Hv'*Dv] tensor in the activation dtype
    grads = x.split(a * tok * c.conv_dim + 8 * tok * c.heads)  # q, k, v in a; g and beta in fp32
    # o's and the gate's gradients (the norm's), less o, the gate, the norm output and rstd, freed by then
    out = 2 * value - 3 * value - x.split(4 * tok * c.heads)

    def rule(dv, given):
        """The chunk re-run and back-propagating, with ChunkedRecurrence's states, for values of width dv; given:
        1 when the start state is the rule's input (not a zero state made in its backward)."""
        Xw, Sw = 4 * rows * h * L * dv, 4 * rows * h * c.dk * dv
        graph = 8 * Q + 10 * Xk + 2 * Xq + (7 + wide) * Xw
        return graph + (segments - 1 + every + 3 - given) * Sw

    if x.c == 1:
        return grads + out + rule(c.dv, 0)
    S, M = 4 * rows * h * c.dk * c.dv, 4 * rows * h * c.dk * c.dk  # the summaries H and M
    # the rule's entering states and the composition's kept states and M copies (counted in `stored`), freed once
    # the rule and the composition back-propagated, before the summary regions do
    composed = composition_kept(c, x)
    out -= composed
    own = 2 * grads + out + rule(c.dv, 0) + S
    no_values = x.split(a * tok * c.heads * c.dk)  # M's zero values and their output's zero gradient
    transition = (grads + x.split(a * tok * 2 * key_width + 8 * tok * c.heads) + value + 2 * no_values
                  - 3 * value - x.split(4 * tok * c.heads) - composed + rule(c.dk, 1) + M)
    return Largest(own, transition)


def delta_backward(c: DeltaShape, x):
    """The delta rule's backward peak beyond `stored` and the output's gradient, shared by both kinds (module
    docstring)."""
    a, tok, h = x.a, x.tok, x.split(c.heads)
    b, piece = x.b * x.pieces, x.s / x.pieces  # rows: under cp the rank's pieces are folded into the batch
    L = Smallest(c.chunk, piece)
    S = 4 * b * h * c.dk * c.dv
    Xk, Xv, Q = 4 * b * h * L * c.dk, 4 * b * h * L * c.dv, 4 * b * h * L**2
    n = sympy.ceiling(piece / c.chunk)  # chunks of a row
    grads = x.split(a * tok * c.conv_dim + 4 * tok * c.heads * (c.decay + 1))
    if x.c > 1:  # a summary region (own state, transition) back-propagating beside the rule's unconsumed gradients
        grads *= 2
    if not c.per_channel:  # Gated DeltaNet, derived term by term (module docstring)
        return scalar_decay_backward(c, x)
    starts = (4 + 2 * sympy.ceiling(sympy.sqrt(n))) * S
    E = 4 * b * h * Smallest(SUB, L) ** 2 * c.dk  # one diagonal block's [SUB, SUB, Dk] decay
    nb = sympy.ceiling(L / SUB)  # diagonal blocks of a chunk
    # the rule output's gradient and o_proj's input gradient, less what the gated norm and o_proj kept (o, the
    # gate, the norm output and fp32 rstd, counted in `stored`), freed as they back-propagated before the rule
    out = x.split(2 * a * tok * c.heads * c.dv) - x.split(3 * a * tok * c.heads * c.dv + 4 * tok * c.heads)
    below = 3 * 4 * b * h * SUB * c.dk * ((nb - 1) + nb * (nb - 1) / 2)  # the blocks below the diagonal
    start = 5 * Q + 3 * nb * E + 13 * Xk + 7 * Xv + below  # the chunk's whole graph, its first gradients
    block = 2 * Q + 12 * Xk + 2 * Xv + (3 * nb + 5) * E  # a diagonal block's einsum back-propagating
    return grads + out + starts + Largest(start, block)


def backward(c: GatedDeltaNetConfig, x):
    return delta_backward(shape(c), x)


KIND = Kind(
    name="gated_deltanet",
    doc="Gated DeltaNet (Qwen3-Next): the delta rule with a per-head scalar decay, output-gated RMSNorm.",
    config=GatedDeltaNetConfig,
    params=(
        Param("key_heads", "int", required=True, min=1, doc="query/key heads Hk"),
        Param("value_heads", "int", nullable=True, min=1,
              doc="value heads Hv, a multiple of key_heads (default: key_heads)"),
        Param("head_dim", "int", 128, min=1, doc="query/key head dim Dk"),
        Param("v_head_dim", "int", nullable=True, min=1, doc="value head dim Dv (default: head_dim)"),
        Param("d_conv", "int", 4, min=1, doc="causal conv taps K over q, k, v"),
        Param("conv_bias", "bool", False),
        Param("chunk", "int", 64, min=1, doc="chunk length of the WY form; a power of two"),
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
