"""Inference on a tensor-parallel model (ltmdsl.distributed's tp split, 2 ranks, gloo, forked workers): a
prefill in two chunks through the cache, then greedy decode steps, equal the single-process model in float64
(logits within 1e-6 relative, the same tokens; measured <= 6e-16), on tiny-hybrid with every kind that has a
tp plan and on one small model per kind. Each rank's cache holds its own heads (KV heads / t, SSM heads / t,
conv channels / t; MLA's replicated latent whole) and its bytes per component equal the memory model's
per-GPU cache at tp = 2 exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from test_tensor_parallel import HEAD_SPLIT
from test_tensor_parallel_fused import FUSED, model, tiny_hybrid_splittable

from ltmdsl.distributed import launch, parallelize, plan_from
from ltmdsl.memory import cache_bytes
from ltmdsl.memory.report import Evaluator
from ltmdsl.memory.settings import resolve
from ltmdsl.runtime.build import build, dtype_ir
from ltmdsl.runtime.cache import COMPONENTS

RTOL = 1e-6
B, T, FIRST, NEW = 2, 12, 8, 4  # sequences, prompt tokens, the first prefill chunk, decoded tokens
TP = 2

#: One small model per kind with a tp plan (the kind and an MLP, twice): the fused-projection kinds and
#: `parallel`, the head-split ones, plain and windowed GQA attention, and a MoE.
KINDS = {**FUSED, **HEAD_SPLIT,
         "attention": "attention(heads = 4, kv_heads = 2, rope_theta = 10000, qkv_bias = true, out_bias = true)",
         "attention-window": "attention(heads = 4, kv_heads = 2, window = 4)",
         "moe": "moe(experts = 4, top_k = 2, d_ff = 16, shared_d_ff = 24, shared_gate = true)"}


def _prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(7))  # [B, T]


@torch.no_grad()
def _infer(net, ids: torch.Tensor) -> dict:
    """Prefill ids [B, T] through a fresh cache in two chunks, then NEW greedy decode steps: the prefill's
    logits [B, T, V], each step's logits [NEW, B, V], the tokens [B, T + NEW], the cache's bytes per component,
    its tensors' shapes and `generate`'s own greedy tokens."""
    cache = net.new_cache(B, T + NEW)
    logits = torch.cat([net(ids[:, :FIRST], cache), net(ids[:, FIRST:], cache)], dim=1)  # [B, T, V]
    tokens, steps = [ids], []
    nxt = logits[:, -1].argmax(-1)  # [B]
    for _ in range(NEW):
        tokens.append(nxt[:, None])
        step = net(nxt[:, None], cache, output="last")[:, -1]  # [B, V]
        steps.append(step)
        nxt = step.argmax(-1)
    shapes = [None if e is None else [tuple(t.shape) for t in e.tensors()] for e in cache.layers]
    return {"prefill": logits, "steps": torch.stack(steps), "tokens": torch.cat(tokens, dim=1),
            "bytes": cache.breakdown(), "shapes": shapes, "generate": net.generate(ids, NEW)}


def _reference(ir) -> dict:
    return _infer(build(ir, seed=0, dtype=torch.float64), _prompt(ir.vocab))


def _ranks(irs) -> list[dict]:
    """On each rank: every model of `irs` split over tp ranks, and its inference."""
    out = []
    for ir in irs:
        ranked = parallelize(ir, plan_from(world=TP, tp=TP), seed=0, dtype=torch.float64)
        out.append(_infer(ranked.model, _prompt(ir.vocab)))
    return out


def _per_gpu_cache(ir) -> dict[str, int]:
    """The memory model's per-GPU cache bytes at tp = 2 (its report's per_gpu_components) for the same batch,
    context and dtypes."""
    f64 = dtype_ir(torch.float64)
    s = resolve(ir, None, mode="inference", gpus=TP, tp=TP, sharding="plan", batch=B, context=T + NEW,
                weight_dtype=f64, activation_dtype=f64, kv_dtype=f64, state_dtype=f64)
    _, per_gpu = Evaluator(ir, s).per_gpu(T + NEW, B)  # what report() puts in per_gpu_components (no solving)
    return {c: per_gpu[c] for c in COMPONENTS}


def _check(got: dict, want: dict) -> None:
    assert_close(got["prefill"], want["prefill"], RTOL, "prefill logits")
    assert_close(got["steps"], want["steps"], RTOL, "decode logits")
    assert torch.equal(got["tokens"], want["tokens"]), "greedy tokens differ"
    assert torch.equal(got["generate"], want["tokens"]), "generate's tokens differ"


@pytest.fixture(scope="module")
def kinds():
    irs = {name: model(layer) for name, layer in KINDS.items()}
    results = launch(_ranks, TP, (list(irs.values()),))
    return {name: (ir, [r[i] for r in results]) for i, (name, ir) in enumerate(irs.items())}


@pytest.mark.parametrize("name", KINDS)
def test_kind_inference_matches_one_process(kinds, name):
    """Each rank's cache bytes: the kinds' cache facets at tp = 2 (`cache_bytes(tp=2)`, the per-GPU report's
    terms; the report itself is checked on tiny-hybrid below)."""
    ir, per_rank = kinds[name]
    want = _reference(ir)
    f64 = dtype_ir(torch.float64)
    predicted = cache_bytes(ir, batch=B, context=T + NEW, kv_dtype=f64, state_dtype=f64, tp=TP)
    for got in per_rank:
        _check(got, want)
        assert got["bytes"] == predicted


@pytest.fixture(scope="module")
def hybrid():
    ir = tiny_hybrid_splittable()
    return ir, [r[0] for r in launch(_ranks, TP, ([ir],))]


def test_tiny_hybrid_inference_matches_one_process(hybrid):
    ir, per_rank = hybrid
    want = _reference(ir)
    predicted = _per_gpu_cache(ir)
    for got in per_rank:
        _check(got, want)
        assert got["bytes"] == predicted
        assert sum(got["bytes"].values()) < sum(want["bytes"].values())  # each rank holds a share, not a copy


def test_rank_caches_hold_their_own_heads(hybrid):
    """Shapes, stated: the global attention's 2 KV heads -> 1 per rank; Mamba-2's 8 heads -> 4 and its conv
    channels Di + 2GN = 128 + 2*2*16 -> 96 (K = 4 taps); MLA's latent whole (16, and the 8-wide shared RoPE
    key)."""
    ir, per_rank = hybrid
    S = T + NEW
    for got in per_rank:
        by_def = {layer.definition: got["shapes"][layer.index] for layer in ir.layers}
        assert by_def["attn"] == [(B, S, 1, 16), (B, S, 1, 16)]
        assert by_def["ssm2"] == [(B, 96, 4), (B, 4, 16, 16)]
        assert by_def["lat"] == [(B, S, 16), (B, S, 8)]
