"""tp for the attention variants whose heads do not split plainly and for Zamba2's shared transformer_block:
gpt-oss's sink logits (split with their heads), Qwen3's qk-norm (one weight per head_dim shared by every
head: replicated, its gradient summed), MQA / GQA with fewer KV heads than tp ranks (each rank holds the KV
head its query heads use, Megatron-LM's replication; the copies' gradients summed), and the transformer_block
(its attention and MLP split as their kinds, each use's LoRA adapters and out_proj split with what they feed).

Each: the loss of the first 3 steps and the first step's gradients equal one process within 1e-5 relative,
in float64 on 2 (or 4) forked gloo ranks (measured at tp 2: losses <= 1.2e-7, gradients <= 8.1e-8 of each
tensor's largest entry, as for plain GQA attention at tp 2: 8.7e-8 and 5.7e-8); each rank's weight, gradient
and optimizer bytes equal the memory model's per-GPU figures exactly; and what cannot split is refused before
launch with the memory model's message."""

from __future__ import annotations

import re

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
    "transformer-block-concat-mqa": "transformer_block(attn = mqa, ffn = gffn, adapter_rank = 4, "
                                    "input = concat_embed, into = next_input)",
}

SHARED = (" layer sat = attention(heads = 4, rope_theta = 10000)\n"
          " layer mqa = attention(heads = 4, kv_heads = 1, qk_norm = true)\n"
          " layer sffn = mlp(d_ff = 64, act = swiglu)\n layer gffn = mlp(d_ff = 64, act = gelu)\n")


def model(layer: str):
    """The layer and an MLP, twice (d_model 32, untied head); a transformer_block as a shared block."""
    if layer.startswith("transformer_block"):
        stack = " stack { x f z f z f }\n shared block z { t }\n"
        body = f"{SHARED} layer t = {layer}\n layer x = attention(heads = 4)\n layer f = mlp(d_ff = 64)\n{stack}"
    else:
        body = f" layer x = {layer}\n layer f = mlp(d_ff = 64)\n stack {{ x f x f }}\n"
    text = f"model m {{\n vocab = 64\n d_model = 32\n dtype = fp32\n head = untied\n{body}}}\n"
    return ltmdsl.loads(text).ir.model()


CASES = [(name, 2, {"tp": 2}) for name in LAYERS] + [("mqa", 4, {"tp": 4}),
                                                    ("transformer-block-concat-mqa", 4, {"tp": 4}),
                                                    ("transformer-block-concat-mqa", 4, {"tp": 2, "zero": 3})]


@pytest.mark.parametrize("name, world, degrees", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in d.items())}" for n, _, d in CASES])
def test_matches_one_process(name, world, degrees):
    """dp 2 x tp 2 with zero 3: FSDP2 shards the replicated KV head's rows and each use's split adapters
    further along dp (the uses in its root)."""
    ir = model(LAYERS[name])
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    losses, grads = launch(rank_run, world, (ir, plan_from(world=world, **degrees), STEPS, torch.float64))[0]
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= RTOL * abs(want), f"step {i}: loss {got} != {want}"
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        assert_close(grads[n], g, RTOL, f"gradient of {n}")


def every_case():
    """Every layer above in one model (one launch per plan)."""
    layers = "".join(f" layer k{i} = {layer}\n" for i, layer in enumerate(LAYERS.values()))
    stack = " ".join(f"k{i} f" for i in range(len(LAYERS)))
    return ltmdsl.loads(f"model m {{\n vocab = 64\n d_model = 32\n dtype = fp32\n head = untied\n{SHARED}{layers}"
                        f" layer f = mlp(d_ff = 64)\n stack {{ {stack} }}\n}}\n").ir.model()


@pytest.mark.parametrize("tp", [2, 4], ids=["tp2", "tp4"])
def test_rank_bytes_equal_the_memory_model(tp):
    """At tp 4 the MQA layers' single KV head is on every rank (D * (d + 1) of k_proj, and of v_proj, whole);
    the prediction is more than P / t by that much and by the replicated norms and qk-norm weights."""
    ir = every_case()
    plan = plan_from(world=tp, tp=tp)
    want = _predicted(ir, plan)
    assert all(got == want for got, _ in launch(_measure, tp, (ir, plan)))
    assert want["weights"] > 4 * ir.params_total / tp


def test_kv_heads_replicated_beyond_tp_in_the_memory_model():
    """The memory model's own arithmetic: below t = Hkv K and V split over t; beyond, each rank holds one KV
    head's rows, so an MQA layer's K/V weights are whole on each of 4 ranks and a GQA-2 layer's are halved
    (the rest of the model is the same in every case)."""
    from ltmdsl.memory import report

    def weights(kv_heads: int, tp: int) -> int:
        ir = model(f"attention(heads = 4, kv_heads = {kv_heads})")
        r = report(ir, None, mode="inference", gpus=tp, tp=tp, weight_dtype="fp32", context=64, batch=1)
        return r.per_gpu_components["weights"]

    head_kv = 2 * 8 * 32 * 4 * 2  # k and v rows of one KV head (head_dim 8) x d_model 32 x fp32, two layers
    assert weights(1, 4) - weights(4, 4) == 0  # one KV head per rank either way
    assert weights(1, 2) - weights(2, 2) == 0
    assert weights(2, 1) - weights(1, 1) == head_kv  # one process holds every head
    assert weights(1, 2) - weights(2, 4) > 0 and weights(4, 2) - weights(4, 4) > 0


REFUSED = {
    "kv-heads-3-tp2": ("attention(heads = 6, kv_heads = 3, head_dim = 8)", 2,
                       "tp = 2 neither divides nor is a multiple of the 3 kv heads of layer 'x'"),
    "adapter-rank-3-tp2": ("transformer_block(attn = sat, ffn = sffn, adapter_rank = 3)", 2,
                           "tp = 2 does not divide the 3 adapter channels (adapter_rank) of layer 't'"),
}


@pytest.mark.parametrize("layer, tp, message", REFUSED.values(), ids=REFUSED.keys())
def test_what_cannot_split_is_refused_before_launch(layer, tp, message):
    """The plan check says it in the memory model's words; the kind's own plan refuses it too."""
    ir = model(layer)
    with pytest.raises(PlanError, match=re.escape(message)):
        check_plan(ir, plan_from(world=tp, tp=tp), tp)
    with pytest.raises(TensorParallelUnsupported, match=r"layer '[xt]': tp = 2 must divide"):
        tp_plans(ir, tp)
