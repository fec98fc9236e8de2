"""Training activations: the bytes one sub-layer stores for its backward pass, per micro-batch.

Notation (per GPU): b = ceil(B/(dp*m)) sequences per micro-batch, s = T/c local tokens (context parallel c),
a = activation bytes (16-bit: 2), t = tensor parallel degree, h = d_model. A tensor is *split* (/t)
when tensor parallelism shards it and *replicated* otherwise; with sequence parallelism (SP) the
replicated ones are split along the sequence too, so everything is /t.

Each layer kind states what its sub-layer stores (the `stored` facet in ltmdsl/kinds/<kind>.py, given
a `MicroBatch` from here): attention after Korthikanti et al. 2022 section 4.1 (generalised to GQA and
Dv), the MLP and MoE likewise, Mamba-1 after `mamba_inner_fn`, Mamba-2 after its fused kernel. Every
sub-layer stores what its pre-norm keeps plus the norm output fed to the mixer (replicated): `MicroBatch.base`.
Two conventions (Settings.saved_by):
    fused  a fused norm keeps its input: 2a*sbh in all (Korthikanti's constant)
    eager  ltmdsl's runtime norms compute their statistics in fp32 (as transformers does), and autograd keeps
           that fp32 copy of the input (the input itself when it is fp32 already: f = max(4, a) bytes) plus
           4 bytes per token of statistics:
               rmsnorm    f*sbh + 4*sb (rsqrt) + a*sbh (normalised, before the weight) + a*sbh (output)
               layernorm  f*sbh + 8*sb (mean, rstd)                               + a*sbh (output)
           and a gated FFN keeps act(gate) for the product's backward (4F per token, not 3F; ltmdsl.kinds.base
           `saved_ffn_width`). Under SP the norm's own terms are /t, but the output a*sbh is the mixer's input,
           which ltmdsl.distributed all-gathers over the sequence and the mixer's projections keep whole (the
           final norm's output likewise, gathered for the vocab-parallel loss); Megatron-LM instead keeps the
           local shard and gathers again in backward, which the fused convention's 2a*sbh/t assumes.
           This is the default: `ltmdsl memory --measure` traces these bytes.
A sub-layer with a post-norm (Gemma-3's sandwich norms) also stores the post-norm's input, a*sbh (replicated).
The paper's GPT block (MHA, a=2, dropout, no flash) is 13sbh + 5as^2b for attention and 21sbh for the
GELU MLP; both together sbh(34 + 5as/h), with TP sbh(10 + 24/t + 5as/(ht)) (`korthikanti_per_layer`).
Recompute:
    none       everything each kind's `stored` facet lists
    selective  drops the attention core (eager: the s*T terms); the recurrent kinds whose runtime op
               recomputes its scan in backward (Mamba-1, Mamba-2, mLSTM, RG-LRU: ltmdsl/runtime/
               chunk_recompute.py) already keep only its inputs, so selective drops nothing more there
    full       only each checkpoint's input a*sbh (replicated) is stored; a checkpoint is a mixer
               sub-layer together with the FFN that follows it (a GPT layer stores 2sbh, as in the paper).
               One checkpoint's full activations are live again while it back-propagates (the
               "working set", added by the stack assembly).
"""

from __future__ import annotations

import sympy

from ltmdsl import kinds
from ltmdsl.ir import ModelIR, NormConfig
from ltmdsl.memory.settings import Settings
from ltmdsl.memory.symbols import B, T, per_replica, q

R = sympy.Rational


class MicroBatch:
    """The per-micro-batch quantities every kind's `stored` facet shares (module docstring notation).

    a activation bytes, w weight bytes, b sequences, c the cp, ep and etp the expert-parallel and expert tensor
    parallel degrees (under cp: `pieces`
    of the rank, `chunks` of the sequence, the traced rank's `last_chunk`), s local tokens T/c, tok = b*s, t the tp degree, sp whether
    replicated tensors are split along the sequence, h = d_model, dropout, flash_attention.
    """

    def __init__(self, model: ModelIR, s: Settings, norm: NormConfig | None = None):
        p = s.parallel
        self.a = s.activation_dtype.bytes
        self.w = s.weight_dtype.bytes
        self.b = per_replica(B, q(p.dp) * p.microbatches)
        self.c = p.cp
        # context parallelism's split of a sequence (ltmdsl.distributed.context_parallel): 2c chunks, a rank
        # holding chunks r and 2c-1-r as two pieces (balanced), or c chunks, one a rank (contiguous); the traced
        # (last) rank's last chunk is c or c - 1
        balanced = p.cp > 1 and p.cp_split == "balanced"
        self.pieces = 2 if balanced else 1
        self.chunks = 2 * p.cp if balanced else p.cp
        self.last_chunk = p.cp if balanced else p.cp - 1
        self.ep = p.ep
        self.plan = p  # the whole plan, for a layout that depends on more than the degrees (MoE parallel folding)
        self.etp = R(p.expert_tp)
        self.s = T / R(p.cp)
        self.tok = self.b * self.s
        self.t = R(p.tp)
        self.sp = p.sequence_parallel or p.tp == 1
        self.h = model.d_model
        self.dropout = s.dropout
        self.flash_attention = s.flash_attention
        self.recompute = s.recompute  # the budget's policy (a kind's backward may depend on what it recomputes)
        self.eager = s.saved_by == "eager"
        self.norm = norm.kind if norm is not None else model.final_norm.kind

    def rep(self, x):
        """A tensor tensor-parallelism replicates (split along the sequence under SP)."""
        return x / self.t if self.sp else x

    def split(self, x):
        """A tensor tensor-parallelism splits."""
        return x / self.t

    def within(self, x):
        """A tensor tensor-parallelism replicates inside a mixer, which runs on every token of the rank's
        sequence (under SP its input is all-gathered first): whole on each rank, SP or not (the router and
        dispatched copies of a MoE, MLA's latent, a parallel layer's scaled inputs)."""
        return x

    @property
    def base(self):
        """What every sub-layer's pre-norm keeps and the norm output fed to the mixer (module docstring):
        2a*sbh fused; eager rmsnorm (f + 2a)*sbh + 4*sb, eager layernorm (f + a)*sbh + 8*sb, f = max(4, a).
        Under SP eager, the mixer's a*sbh input is not /t: it is the all-gathered copy the mixer keeps."""
        return self.base_at(self.h)

    def base_at(self, width):
        """`base` for a pre-norm over `width` channels (2h for a sub-layer reading cat[h, embeddings])."""
        if not self.eager:
            return self.rep(2 * self.a * self.tok * width)
        f = max(4, self.a)
        mixer_input = self.a * self.tok * width  # the norm's output, kept by the mixer: whole under SP (gathered)
        if self.norm == "layernorm":
            return self.rep(f * self.tok * width + 8 * self.tok) + mixer_input
        return self.rep((f + self.a) * self.tok * width + 4 * self.tok) + mixer_input

    @property
    def norm_backward(self):
        """What a norm (the final norm: `ltmdsl.memory.training.temporaries`) holds while it back-propagates, beyond
        what it keeps:
        the output's gradient in fp32, times the weight, the normalised input's and the input's fp32 gradients
        (four fp32 [tok, h] tensors) beside the stream's gradient in a, (16 + a)*sbh (replicated; traced: 18 bytes
        a token and channel at a = 2, on one GPU and on a tp rank, whose norms see the whole width)."""
        return self.rep((16 + self.a) * self.tok * self.h)


def stored(m, model: ModelIR, s: Settings, recompute: str | None = None, norm: NormConfig | None = None,
           post_norm=None):
    """Bytes one sub-layer (mixer config `m`, pre-norm `norm`; default the model's norm kind) stores for
    backward, per micro-batch, under `recompute` none|selective.

    A sub-layer with a post-norm (sandwich norms) also stores that norm's input, a*sbh (replicated).
    Full recompute is handled by `checkpoint` and the working set; pass none or selective here.
    """
    recompute = recompute or s.recompute
    x = MicroBatch(model, s, norm)
    post = x.rep(x.a * x.tok * x.h) if post_norm is not None else 0
    return kinds.kind_of(m).stored(m, x, recompute != "none") + post


def checkpoint(model: ModelIR, s: Settings):
    """Full recompute: the stored input of one checkpoint, a*sbh (replicated; /t under SP)."""
    x = MicroBatch(model, s)
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
