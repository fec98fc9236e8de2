"""Shared cases for the distributed tests: the models, a fixed batch, and the same training steps run in
one process (the reference) and on N forked ranks under a plan.

Two models: tiny-hybrid's first-release layers (attention global and windowed, Mamba-1, Mamba-2, MLP, MoE:
`DIST_STACK`, small enough for the many plan combinations; the context-parallel tests also run tiny-hybrid
with every kind) and a small attention + MLP model with the shapes tensor parallelism splits (heads and kv
heads divisible by 2, a window, an untied head).
"""

from __future__ import annotations

import torch
from helpers import assert_close
from paths import EXAMPLES

import ltmdsl
from ltmdsl.ir import ModelIR, ParallelPlan

TP_SPEC = """
model tp_small {
    vocab = 96
    d_model = 32
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer attn = attention(heads = 4, kv_heads = 2, rope_theta = 10000)
    layer swa = attention(heads = 4, kv_heads = 2, window = 8, qkv_bias = true)
    layer ffn = mlp(d_ff = 64, act = swiglu)
    layer gelu = mlp(d_ff = 48, act = gelu, bias = true)
    stack { attn ffn swa gelu }
}
"""

STEPS, LR, B, T = 3, 1e-2, 4, 24


DIST_STACK = "ssm1 ffn ssm2 moe swa ffn attn ffn"


def tiny_hybrid() -> ModelIR:
    """tiny-hybrid's definitions with the stack of `DIST_STACK`."""
    text = (EXAMPLES / "tiny-hybrid.ltm").read_text()
    head, _, rest = text.partition("    stack {")
    _, _, tail = rest.partition("    }\n}")
    return ltmdsl.loads(f"{head}    stack {{ {DIST_STACK} }}\n}}{tail}").ir.model()


def tp_small() -> ModelIR:
    return ltmdsl.loads(TP_SPEC).ir.model()


def batches(vocab: int, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` fixed batches of ids [B, T] and next-token targets [B, T]."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        seq = torch.randint(0, vocab, (B, T + 1), generator=gen)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def reference_run(ir: ModelIR, steps: int = STEPS, dtype: torch.dtype | None = None):
    """Single process: (losses of each step, gradients of the first step {name: tensor}); `dtype` overrides
    the spec's."""
    from ltmdsl.runtime.build import build

    torch.manual_seed(0)
    model = build(ir, seed=0, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], {}
    for i, (ids, tgt) in enumerate(batches(ir.vocab, steps)):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids, tgt)
        loss.backward()
        if i == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads


def rank_run_without_full_logits(ir: ModelIR, plan: ParallelPlan, steps: int = STEPS):
    """rank_run with LTModel.head (which gathers [B, T, V] logits under tp) made to fail in this forked
    worker: the training loss must go through the chunked, vocab-parallel head instead."""
    from ltmdsl.runtime.model import LTModel

    def refuse(self, h):
        raise AssertionError("the training loss gathered [B, T, V] logits")

    LTModel.head = refuse  # this forked worker's class only
    return rank_run(ir, plan, steps)


def rank_run(ir: ModelIR, plan: ParallelPlan, steps: int = STEPS, dtype: torch.dtype = torch.float32):
    """On every rank: the same steps under `plan` in `dtype`; (losses, first-step full gradients on rank 0
    else None; under pp every rank returns its stage's)."""
    import torch.distributed as dist

    from ltmdsl.distributed import parallelize, shard_batch
    from ltmdsl.distributed.step import forward_backward, full_gradients

    ranked = parallelize(ir, plan, seed=0, dtype=dtype)
    opt = ranked.optimizer(lr=LR)
    losses, grads = [], None
    for i, (ids, tgt) in enumerate(batches(ir.vocab, steps)):
        ids, tgt = shard_batch(ids, ranked), shard_batch(tgt, ranked)
        opt.zero_grad(set_to_none=True)
        losses.append(forward_backward(ranked, ids, tgt))
        if i == 0:  # gathered before the optimizer moves the weights (a collective: every rank calls it)
            g = full_gradients(ranked.model)
            grads = g if dist.get_rank() == 0 or plan.pp > 1 else None  # pp: each stage its own
        opt.step()
    return losses, grads


def stage_grads(results) -> dict:
    """The gradients the ranks returned, merged in rank order (under pp each stage's ranks return their own
    stage's; a rank may return None)."""
    grads = {}
    for _, g in results:
        grads.update(g or {})
    return grads


def assert_matches_reference(results, reference, rtol: float, *, grads: dict | None = None,
                             same_names: bool = True) -> None:
    """A distributed run against the one-process `reference` (losses, gradients): every rank's losses equal
    rank 0's and are within `rtol` (relative) of the reference's, and `grads` (rank 0's by default) equal the
    reference's within `rtol`; with `same_names`, they name the same parameters as well."""
    ref_losses, ref_grads = reference
    losses = results[0][0]
    assert all(r[0] == losses for r in results), "ranks disagree on the global loss"
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= rtol * abs(want), f"step {i}: loss {got} != {want}"
    grads = results[0][1] if grads is None else grads
    if same_names:
        assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert_close(grads[name], g, rtol, f"gradient of {name}")
