"""Training model states (weights, gradients, optimizer), the loss logits and pipeline in-flight counts.

Model states per GPU, for P parameters held by a pipeline stage, with w, g, o the weight, gradient and
optimizer bytes per parameter. Per tensor-parallel rank, P counts what the runtime's tp plan holds there:
split parameters / t, the routed experts' / (etp*ep) (MoE parallel folding: etp ranks split an expert's width,
etp = t unless the plan says otherwise, as Megatron-Core's --expert-tensor-parallel-size), and the
tp-replicated ones whole: every norm (pre-, post- and
final norms; they see the full, all-reduced activations) and what each kind's `split` facet states as
`replicated` (row-parallel output biases, MLA's latent projections, the MoE router, norm weights shared by
heads on different ranks). Until the tp-replicated convention, every parameter was divided by t, so a tp
rank was predicted slightly less than it holds; at t = 1 nothing changes.

    weights    P*w / (N if ZeRO-3 else 1); ZeRO-3 adds the parameters outside the mixers (embedding, norms,
               head: FSDP2's root in ltmdsl.distributed), gathered whole from the forward through the backward
    gradients  P*g / (N if ZeRO >= 2 else 1)
    optimizer  P*o / (N if ZeRO >= 1 or Megatron's distributed optimizer else 1)

N = dp*c for dense parameters (Megatron shards the distributed optimizer over the data- and
context-parallel ranks, which hold identical weights) and edp = t*c*dp / (etp*ep) for expert parameters: the
expert-data-parallel ranks, those of the stage's t*c*dp holding the same experts (dp*c/ep at etp = t; the
budget checks refuse a plan whose etp*ep does not divide t*c*dp, which counted the experts over ranks that do
not exist: tp = 8, ep = 8 on 8 GPUs divided them by 64).
Bytes-per-parameter conventions (AdamW, mixed precision):

    16  ZeRO paper: fp16 weights and gradients (w = g = 2) + fp32 master, m, v (o = 12)
    18  Megatron, bf16 weights with fp32 main gradients (w = 2, g = 4, o = 12)   <- the default
    20  Megatron fp16: fp16 gradients plus an fp32 copy in the optimizer (w = 2, g = 2, o = 16)

Megatron's distributed optimizer gives 6 + 12/dp for the default: only o is sharded.
ZeRO figure 1 check (P = 7.5e9, N = 64, w = g = 2, o = 12): 120, 31.4, 16.6, 1.9 GB for stages 0-3.

Logits: the output layer's fp32 logits, 4*b*s*V, per micro-batch on the last stage.
At long context they dominate (V = 128256, s = 1Mi: 538 GB per sequence), hence the option of a
chunked loss (`chunked_loss`): logits for min(C, s) tokens at a time, 4*b*min(C, s)*V.
Under tensor parallelism (t > 1) training runs the vocab-parallel cross-entropy of ltmdsl.train.loss on each
rank's V/t head rows (never [s, V] on a rank), which forms its gradients in the forward and keeps them
instead of logits: d loss / d hidden, a*b*s*d, and d loss / d head rows in fp32, 4*d*V/t, whatever the chunk.
(For a while this counted whole V on every tp rank, as the trace then gathered the head's V/t logits through
LTModel.head, inference's path; the trace now runs training's loss, and so does this count.)

Temporaries: what the backward allocates only for a moment, at the step's peak (all activations still live),
the largest of:
    the loss's backward  8*b*s*V (the fp32 gradients of the log-softmax output and of the logits; with a chunked
                         loss (a + 12)*b*min(C, s)*V, one chunk's recomputed logits and both gradients); under tp
                         the vocab-parallel loss's working set instead (`vocab_parallel_working`), one chunk of
                         c = b*min(C, s) rows (b*s unchunked) at a time on V/t columns
    ZeRO-3               two mixers' weights gathered whole (the one back-propagating and the next, prefetched),
                         2*P_mixer*w/t
    one sub-layer's      its kind's `backward` facet (ltmdsl/kinds/<kind>.py: its inputs' gradients, a recomputed
    backward             region's fp32 tensors, one chunk's re-run scan graph and the chunk start states its autograd
                         node keeps, an eager attention core's score gradients, a weight's gradient in w before the
                         hooks add it into the fp32 main gradient), under selective recompute plus what that dropped
                         of the sub-layer, live again for its backward; less the loss's logits (last stage), which
                         the loss's backward has freed by then, and less the kept activations of the sub-layers
                         after it in the stage, freed as they back-propagated (each configuration at its last place);
                         under full recompute less the rest of its checkpoint unit (a mixer's FFN), recomputed and
                         back-propagated before it (ltmdsl/memory/assemble.py)
    the final norm's     what the final norm holds while it back-propagates (`MicroBatch.norm_backward`: four
    backward             fp32 [tok, d] tensors and the stream's gradient in a), every sub-layer's activations
                         still live and the logits freed
Under full recompute the loss and the final norm back-propagate before any checkpoint is recomputed, so their
terms are less the working set (which the activations count for the checkpoint back-propagating).
(Until this convention the sub-layer's own backward was not counted, and the traced peak of two-layer stacks was
+9% (RG-LRU) to +43% (Mamba-1, full recompute) over the per-GPU total, +58% with a recomputed eager attention
core.) Not counted: the optimizer step's chunked temporaries (after the activations are freed, so below the
peak) and gradient-norm clipping (the traced step does not clip).

Pipeline: with 1F1B, stage i keeps min(p - i, m) micro-batches in flight, so the first stage holds
p micro-batches of L/p layers: L layers' worth. Interleaving (v > 1 virtual stages) multiplies the
first stage's activations by 1 + (p - 1)/(p*m) (Korthikanti et al.).
"""

from __future__ import annotations

import sympy

from ltmdsl import kinds
from ltmdsl.ir import ModelIR, SubLayer
from ltmdsl.memory.settings import Settings
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica, q

R = sympy.Rational


def split_params(layer: SubLayer, model: ModelIR, tp: int = 1) -> tuple[int, int, int]:
    """(dense, expert, replicated) parameters of a sub-layer (`split` facet) under tp degree `tp`: experts
    are what expert parallelism shards; replicated ones every tp rank holds whole (its norms and the mixer's
    replicated parts); dense ones, the rest, tp splits. Grouped parameters beyond their group count (KV
    heads at t > Hkv) count as replicated for their params / n per rank, so dense / t + replicated is a
    rank's share exactly."""
    split = kinds.kind_of(layer.mixer).split(layer.mixer, model.d_model)
    post = layer.post_norm.params_per_channel if layer.post_norm else 0
    width = layer.residual.width  # the pre-norm of a concat_embed sub-layer normalises cat[x, e], 2d wide
    norms = (layer.norm.params_per_channel * width + post) * model.d_model
    replicated = norms + split.replicated
    dense, replicated = _grouped(layer.params - split.expert_params - replicated, replicated, split.grouped, tp)
    return dense, split.expert_params, replicated


def use_split(layer: SubLayer, model: ModelIR, tp: int = 1) -> tuple[int, int]:
    """(dense, replicated) of the parameters a tied use of a shared block owns (`per_use`), under tp."""
    split = kinds.kind_of(layer.mixer).split(layer.mixer, model.d_model)
    return _grouped(layer.use_params, 0, split.use_grouped, tp)


def _grouped(dense: int, replicated: int, grouped, tp: int) -> tuple[int, int]:
    """Move every group-split part (Split.grouped) that tp replicates (t > n) from dense to params / n held
    whole: a rank holds one group of it."""
    for _what, n, params in grouped:
        if tp > n:
            dense, replicated = dense - params, replicated + params // n
    return dense, replicated


def _shards(s: Settings, expert: bool):
    """How many ranks share one copy of a parameter's ZeRO-sharded state (see module docstring)."""
    n = q(s.dp) * s.cp
    if expert:
        n = Largest(1, n * R(s.tp, s.etp * s.ep))
    return n


def model_states(dense: int, expert: int, s: Settings, replicated: int = 0) -> dict[str, sympy.Expr]:
    """{"weights", "gradients", "optimizer"} bytes per GPU for parameters held by one stage: `dense` split
    over tp, `expert` over etp * ep, `replicated` whole on every tp rank (ZeRO shards it like dense ones).

    In inference only "weights" is returned and nothing is sharded over data-parallel ranks.
    """
    p_dense = R(dense, s.tp) + replicated
    p_expert = R(expert, s.etp * s.ep)
    w = s.weight_dtype.bytes
    if s.mode == "inference":
        return {"weights": (p_dense + p_expert) * w}
    z = s.parallel.zero
    g = s.grad_dtype.bytes
    o = 0 if s.optimizer == "none" else s.optimizer_bytes_per_param

    def per_gpu(bytes_per_param: int, sharded: bool):
        if not sharded:
            return (p_dense + p_expert) * bytes_per_param
        return (p_dense / _shards(s, False) + p_expert / _shards(s, True)) * bytes_per_param

    return {
        "weights": per_gpu(w, z >= 3),
        "gradients": per_gpu(g, z >= 2),
        "optimizer": per_gpu(o, z >= 1 or s.parallel.distributed_optimizer),
    }


def _acc_bytes(s: Settings) -> int:
    """Bytes of the vocab-parallel loss's softmax elements: fp32, fp64 for fp64 activations."""
    return 8 if s.activation_dtype.bytes == 8 else 4


def loss_logits(model: ModelIR, s: Settings):
    """fp32 logits of one micro-batch on the last stage: 4*b*(min(C, s) if chunked else s)*V, twice with a
    final-logit soft cap (its tanh output is kept for backward beside the capped logits the loss keeps;
    measured with autograd's saved-tensor hooks: 2.00 logits-sized tensors instead of 1.00).

    Under tensor parallelism, what the vocab-parallel loss keeps for its backward in their place (module
    docstring): d loss / d hidden, a*b*s*d, and d loss / d head rows, 4*d*V/t (cap or not). Not whole-V logits:
    that convention followed a trace of the gathered inference head, which no training rank runs."""
    p = s.parallel
    b = per_replica(B, q(p.dp) * p.microbatches)
    tokens = T / R(p.cp)
    if p.tp > 1:
        return s.activation_dtype.bytes * b * tokens * model.d_model + _acc_bytes(s) * model.d_model * R(model.vocab, p.tp)
    if s.chunked_loss:
        tokens = Smallest(C, tokens)
    copies = 2 if model.logit_cap is not None else 1
    return copies * 4 * b * tokens * model.vocab


def temporaries(model: ModelIR, s: Settings, last: bool, largest_mixer: int, layers=(), working=0,
                final_norm=0):
    """The backward's transient buffers at the step's peak, beyond everything held (module docstring): the
    largest of the loss's backward (last stage), under ZeRO-3 two gathered mixers, and one sub-layer's backward
    (`layers`, each sub-layer group's `backward` facet plus what selective recompute dropped of it), which runs
    after the loss has freed its logits, as the final norm's backward (`final_norm`, last stage) does. `working`:
    full recompute's working set, counted in the activations but not yet recomputed while the loss and the final
    norm back-propagate."""
    p = s.parallel
    b = per_replica(B, q(p.dp) * p.microbatches)
    tokens = T / R(p.cp)
    terms = []
    if last and p.tp > 1:
        terms.append(Largest(0, vocab_parallel_working(model, s) - working))
    elif last:
        if s.chunked_loss:  # one chunk recomputed: its logits (a and fp32) and the two fp32 gradients
            terms.append(Largest(0, (s.activation_dtype.bytes + 12) * b * Smallest(C, tokens) * model.vocab - working))
        else:  # the fp32 gradients of the log-softmax output and of the logits
            terms.append(Largest(0, 8 * b * tokens * model.vocab - working))
    if p.zero >= 3:  # the mixer back-propagating and the next one, prefetched, gathered whole
        terms.append(2 * largest_mixer * s.weight_dtype.bytes / R(p.tp))
    freed = loss_logits(model, s) if last else 0  # the loss's logits are gone when the stack back-propagates
    if layers:
        terms.append(Largest(0, Largest(*layers) - freed))
    if last:
        terms.append(Largest(0, final_norm - freed - working))
    return Largest(*terms) if len(terms) > 1 else (terms[0] if terms else sympy.Integer(0))


def vocab_parallel_working(model: ModelIR, s: Settings):
    """The vocab-parallel loss's transient bytes beyond what it keeps (`loss_logits`), one chunk of c rows on
    V' = V/t columns at a time, f the softmax's element bytes (fp32): the largest of
        its softmax       (3 + 2*cap)*f*c*V'   the logits, logits - max and its exp (and under a soft cap its
                                               tanh, the capped logits and the cap's derivative)
        its weight step   (2 + cap)*f*c*V' + f*V'*d + f*c*d   logits, softmax, the chunk's weight gradient
                                               and its rows in fp32
        its backward      a*b*s*d + (f + w)*V'*d   both saved gradients scaled, the weight's cast to w
    plus, when the weight dtype is not the activations', the head rows cast to a (a*V'*d, the whole loss)."""
    p = s.parallel
    b = per_replica(B, q(p.dp) * p.microbatches)
    tokens = T / R(p.cp)
    rows = b * (Smallest(C, tokens) if s.chunked_loss else tokens)  # c
    a, w, f, d = s.activation_dtype.bytes, s.weight_dtype.bytes, _acc_bytes(s), model.d_model
    cols = R(model.vocab, p.tp)  # V'
    cap = 1 if model.logit_cap is not None else 0
    cast = a * cols * d if a != w else 0
    return Largest((3 + 2 * cap) * f * rows * cols + cast,
                     (2 + cap) * f * rows * cols + f * cols * d + f * rows * d + cast,
                     a * b * tokens * d + (f + w) * cols * d)


def in_flight(stage: int, s: Settings):
    """Micro-batches whose activations stage `stage` holds at the 1F1B peak (module docstring)."""
    p, m = s.parallel.pp, s.parallel.microbatches
    n = R(min(p - stage, m))
    if stage == 0 and p > 1 and s.parallel.interleave > 1:
        n *= 1 + R(p - 1, p * m)
    return n


def chunked_loss_advice(logits_bytes: int, capacity: int, other_bytes: int) -> str | None:
    """A note when the un-chunked fp32 logits are the problem: they exceed a quarter of the GPU or
    every other component together. None when the logits are harmless."""
    if logits_bytes > capacity // 4 or logits_bytes > other_bytes:
        return ("fp32 logits take {:.1f}% of the GPU: use a chunked loss (chunked_loss = true) "
                "to keep only a chunk of C tokens' logits").format(100 * logits_bytes / capacity)
    return None
