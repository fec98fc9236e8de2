"""Inference memory beyond the layers' own facets: the residual stream, logits, cache and weight bytes.

Per GPU with tensor parallelism t, context parallelism c and data parallelism dp (b = ceil(B/dp) sequences
per GPU), in bytes. Each layer kind states its own KV cache or recurrent state (`cache` facet) and its
prefill workspace (`workspace` facet) in ltmdsl/kinds/<kind>.py; this module adds what belongs to the
stack rather than to a kind:

Prefill workspace: the transient tensors of one sub-layer while a chunk of Cc = min(C, T) tokens is
processed. Layers run one after another and free their workspace, so the stack needs the residual
stream plus the *largest* sub-layer workspace:
    residual   2 * a * b * Cc/c * d                       (x and norm(x))
               + a * b * Cc/c * d when a sub-layer reads `input = concat_embed` (Zamba2's shared blocks):
               the embeddings, held through the whole stack for those sub-layers' cat[x, embeddings]

The stack's activations are the larger of that and the moment a pre-norm runs (`norm_workspace`): the
previous mixer's output, the residual and their sum, with the norm's fp32 working copies, (3a + 8)*b*Cc/c*d,
which exceeds the layers' term only when no sub-layer's workspace is wider than about 5 model widths.

Logits: fp32 logits of the last position of each sequence, 4 * b * V (sampling needs no more). Under tensor
parallelism each rank computes V/t of them and they are gathered before sampling (the runtime's LTModel.head
all-gathers them, as Megatron-LM's and vLLM's logits processors do), so every rank holds all V: until the
runtime ran tp inference this counted 4 * b * V / t, which no rank holds.
Weights: params * weight_bytes / t (the routed experts' / (etp * ep)), except what tensor parallelism replicates
(norms and each kind's `Split.replicated`), held whole on every tp rank; embeddings are vocab-parallel.
"""

from __future__ import annotations

import sympy

from ltmdsl import kinds
from ltmdsl.ir import Dtype, ModelIR
from ltmdsl.kinds.base import CACHE_COMPONENTS
from ltmdsl.memory.settings import Settings
from ltmdsl.memory.symbols import B, C, Smallest, T, ceil_bytes, compile_exact, per_replica

R = sympy.Rational


def held_embeddings(model: ModelIR) -> int:
    """1 when a sub-layer reads cat[x, embeddings] (`input = concat_embed`): the runtime keeps the chunk's
    embeddings [b, Cc/c, d] from the embedding to the last such sub-layer (LTModel.forward's `embeds`); else 0."""
    return int(any(layer.residual.input == "concat_embed" for layer in model.layers))


def residual_workspace(model: ModelIR, s: Settings):
    """The residual stream and its normalised copy for one chunk, and the embeddings where a sub-layer reads
    them: (2 + `held_embeddings`) * a * b * Cc/c * d."""
    width = 2 + held_embeddings(model)
    return width * s.activation_dtype.bytes * per_replica(B, s.dp) * Smallest(C, T) / R(s.cp) * model.d_model


def norm_workspace(model: ModelIR, s: Settings):
    """The moment a pre-norm runs: the previous mixer's output, the residual and their sum (3a per element)
    with the norm's fp32 statistics input and its square or scaled copy (8 bytes; 4 when a is fp32, whose
    input needs no copy), over b * Cc/c tokens of d, and the held embeddings (`held_embeddings`):
    (3a + f + a * held) * b * Cc/c * d."""
    a = s.activation_dtype.bytes
    f = (4 if a < 4 else 0) + max(4, a)
    tokens = per_replica(B, s.dp) * Smallest(C, T) / R(s.cp)
    return (3 * a + f + a * held_embeddings(model)) * tokens * model.d_model


def logits(model: ModelIR, s: Settings):
    """fp32 logits of the last position of each sequence on one GPU, gathered over tp: 4 * b * V."""
    return 4 * per_replica(B, s.dp) * model.vocab


def cache_bytes(model: ModelIR, *, batch: int, context: int, kv_dtype: Dtype, state_dtype: Dtype,
                conv_taps: str = "full", tp: int = 1, cp: int = 1) -> dict[str, int]:
    """Exactly what `model.new_cache(batch, context, ...)` allocates (CONTRACTS.md), in bytes; with `tp`, what
    it allocates on one rank of the model split over tp ranks (the per-GPU cache of the report at that tp);
    with `cp`, what one context-parallel rank allocates (ltmdsl.distributed.cp_inference: 1/cp of every
    attention layer's slots, recurrent states whole).

    {"kv_cache": ..., "recurrent_state": ...}: the sum over sub-layers of each kind's `cache` facet
    (attention KV, Mamba conv + SSM state; nothing for feed-forward networks). Tied sub-layers share
    weights, not caches, so every sub-layer counts.
    """
    from ltmdsl.memory.settings import resolve

    s = resolve(model, None, batch=batch, context=context, kv_dtype=kv_dtype, state_dtype=state_dtype,
                conv_taps=conv_taps, **({"tp": tp, "cp": cp, "gpus": tp * cp} if tp * cp > 1 else {}))
    totals = dict.fromkeys(CACHE_COMPONENTS, sympy.Integer(0))
    counts: dict = {}
    for layer in model.layers:
        counts[layer.mixer] = counts.get(layer.mixer, 0) + 1
    for m, n in counts.items():
        for term in kinds.kind_of(m).cache(m, s):
            totals[term.component] += n * term.bytes
    return {comp: ceil_bytes(compile_exact(expr)(context, batch, 1)) for comp, expr in totals.items()}


def weights_bytes(model: ModelIR, dtype: Dtype | str) -> int:
    """(params_total + params_mtp) * dtype.bytes (tied weights counted once; the multi-token-prediction
    modules, where the model declares them, are held beside the main model)."""
    from ltmdsl.memory.settings import as_dtype

    return (model.params_total + model.params_mtp) * as_dtype(dtype).bytes
