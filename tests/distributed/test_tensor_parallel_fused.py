"""tp for the kinds with fused projections (runtime.tensor_parallel.segmented: each rank holds its 1/t of
every segment of a fused weight, Megatron-LM's Mamba split) and for `parallel` layers: the loss of the first
3 steps and the first step's gradients equal one process within 1e-5 relative, at tp = 2 and at tp = 4
where the heads allow. Run in float64 so that the comparison sees the split rather than fp32 rounding (in
fp32 the losses agree to ~1e-7, but a delta rule's heads that forget almost at once have dt_bias / A_log
gradients ~1e-7 in size, which fp32 rounding moves by ~4e-5 relative); measured <= 1e-12. Each rank's
weights, gradients and optimizer bytes equal the memory model's per-GPU figures exactly. Configs that tp
cannot divide are refused naming the layer and what does not divide. (Their distributed checkpoints:
tests/distributed/test_checkpoint.py.)"""

from __future__ import annotations

import pytest
import torch
from dist_cases import STEPS, rank_run, reference_run
from helpers import assert_close
from test_memory import _measure, _predicted

import ltmdsl
from ltmdsl.distributed import launch, plan_from
from paths import EXAMPLES
from ltmdsl.distributed.tensor_parallel import tp_plans
from ltmdsl.runtime.kinds import TensorParallelUnsupported

RTOL = 1e-5

FUSED = {
    "mamba2": "mamba2(d_state = 8, head_dim = 8, expand = 2, n_groups = 4, chunk = 8, proj_bias = true, "
              "conv_bias = true)",
    "mamba2-ungated": "mamba2(d_state = 8, head_dim = 8, expand = 2, n_groups = 2, chunk = 8, gated_norm = false)",
    # fewer groups than ranks (Mamba-2-2.7B): B and C replicated over the ranks, the gated norm over all of Di
    "mamba2-one-group": "mamba2(d_state = 8, head_dim = 8, expand = 2, n_groups = 1, chunk = 8, proj_bias = true)",
    "mamba": "mamba(d_state = 8, d_conv = 4, expand = 2, proj_bias = true, conv_bias = true)",
    "mamba-inner-norms": "mamba(d_state = 8, expand = 2, dt_rank = 4, inner_norms = true)",
    "gated_deltanet": "gated_deltanet(key_heads = 4, value_heads = 8, head_dim = 8, chunk = 8, conv_bias = true)",
    "kda": "kda(heads = 4, head_dim = 8, chunk = 8, conv_bias = true)",
    "short_conv": "short_conv(kernel = 3, bias = true)",
    "lightning": "lightning(heads = 4, chunk = 8)",
    "lightning-gate": "lightning(heads = 4, head_dim = 4, chunk = 8, gate = true)",
    "parallel-attention-mamba2": "parallel(a = att, b = ssm, a_in = 0.5, b_out = 0.8)",  # Falcon-H1's
    "parallel-mamba2-deltanet": "parallel(a = ssm, b = dn)",
}


BRANCHES = (" layer att = attention(heads = 4, kv_heads = 2, out_bias = true)\n"
            " layer ssm = mamba2(d_state = 8, head_dim = 8, expand = 2, n_groups = 2, chunk = 8)\n"
            " layer dn = gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 8, chunk = 8)\n")


def model(layer: str):
    """The layer and an MLP, twice (d_model 32, untied head; `parallel` branches from BRANCHES)."""
    return ltmdsl.loads(f"model m {{\n vocab = 64\n d_model = 32\n dtype = fp32\n head = untied\n{BRANCHES}"
                        f" layer x = {layer}\n layer f = mlp(d_ff = 64)\n stack {{ x f x f }}\n}}\n").ir.model()


TP4 = ("mamba2", "mamba", "gated_deltanet", "kda", "short_conv", "lightning")  # the rest at tp = 2 only (fast)
CASES = [(name, t) for name in FUSED for t in (2, 4) if t == 2 or name in TP4]


@pytest.mark.parametrize("name, tp", CASES, ids=[f"{n}-tp{t}" for n, t in CASES])
def test_fused_kind_matches_one_process(name, tp):
    ir = model(FUSED[name])
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    losses, grads = launch(rank_run, tp, (ir, plan_from(world=tp, tp=tp), STEPS, torch.float64))[0]
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= RTOL * abs(want), f"step {i}: loss {got} != {want}"
    for n, g in ref_grads.items():
        assert_close(grads[n], g, RTOL, f"gradient of {n}")


COMBINED = {"dp2-tp2-zero3": {"tp": 2, "zero": 3}, "tp2-cp2": {"tp": 2, "cp": 2}}


@pytest.mark.parametrize("degrees", COMBINED.values(), ids=COMBINED.keys())
def test_segmented_split_composes_with_fsdp_and_cp(degrees):
    """FSDP2 shards the rank-major fused weights further along dp, and cp runs each kind's cp_forward on a
    rank's heads: Mamba-2 and Gated DeltaNet side by side, on 4 ranks, equal one process (1e-5, float64)."""
    ir = model(FUSED["parallel-mamba2-deltanet"])
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    losses, grads = launch(rank_run, 4, (ir, plan_from(world=4, **degrees), STEPS, torch.float64))[0]
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= RTOL * abs(want), f"step {i}: loss {got} != {want}"
    for n, g in ref_grads.items():
        assert_close(grads[n], g, RTOL, f"gradient of {n}")


def test_fused_kinds_rank_bytes_equal_the_memory_model():
    """Every case above in one model (one launch): each tp rank's bytes equal the per-GPU prediction."""
    layers = "".join(f" layer k{i} = {layer}\n" for i, layer in enumerate(FUSED.values()))
    stack = " ".join(f"k{i} f" for i in range(len(FUSED)))
    ir = ltmdsl.loads(f"model m {{\n vocab = 64\n d_model = 32\n dtype = fp32\n head = untied\n{BRANCHES}"
                      f"{layers} layer f = mlp(d_ff = 64)\n stack {{ {stack} }}\n}}\n").ir.model()
    plan = plan_from(world=2, tp=2)
    want = _predicted(ir, plan)
    assert all(got == want for got, _ in launch(_measure, 2, (ir, plan)))


@pytest.mark.parametrize("layer, tp, message", [
    ("mamba2(d_state = 8, head_dim = 4, heads = 6, n_groups = 3, chunk = 8)", 2,
     "layer 'x': tp = 2 must divide the mamba2's 6 heads, and divide its 3 groups \\(n_groups\\) or be a "
     "multiple of them"),
    ("mamba2(d_state = 8, head_dim = 16, expand = 2, n_groups = 2, chunk = 8)", 8,
     "layer 'x': tp = 8 must divide the mamba2's 4 heads, and divide its 2 groups"),
    ("mamba(expand = 3, d_state = 8)", 64, "layer 'x': tp = 64 must divide the mamba's 96 inner channels"),
    ("gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 8)", 4,
     "layer 'x': tp = 4 must divide the gated_deltanet's 2 key heads"),
    ("kda(heads = 2, head_dim = 8)", 4, "layer 'x': tp = 4 must divide the kda's 2 heads"),
    ("short_conv(kernel = 3)", 64, "layer 'x': tp = 64 must divide the short_conv's 32 channels"),
    ("lightning(heads = 4)", 8, "layer 'x': tp = 8 must divide the lightning's 4 heads"),
    ("parallel(a = ssm, b = dn)", 16, "layer 'x': branch a: tp = 16 must divide the mamba2's 8 heads"),
], ids=["mamba2-groups", "mamba2-heads", "mamba-channels", "deltanet-key-heads", "kda-heads", "short-conv",
        "lightning-heads", "parallel-branch"])
def test_undividable_config_is_refused_by_name(layer, tp, message):
    with pytest.raises(TensorParallelUnsupported, match=message):
        tp_plans(model(layer), tp)


def tiny_hybrid_splittable():
    """examples/tiny-hybrid.ltm as shipped, every kind in its stack (its MQA window attention's one KV head
    replicated on both ranks, its transformer_block split with its adapters, its Mamba-2's one group of B and
    C replicated on both ranks, alone and as a `parallel` branch). (Until Mamba-2 ran with fewer groups than
    ranks its n_groups was made 2 here.)"""
    ir = ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm").ir.model()
    assert any(layer.kind == "mamba2" and layer.mixer.n_groups == 1 for layer in ir.layers)
    return ir


def test_tiny_hybrid_every_kind_matches_one_process():
    ir = tiny_hybrid_splittable()
    assert {layer.kind for layer in ir.layers} >= {"attention", "mla", "mamba", "mamba2", "gated_deltanet", "kda",
                                                   "short_conv", "lightning", "rg_lru", "mlstm", "parallel",
                                                   "transformer_block", "mlp", "moe"}
    assert any(layer.kind == "attention" and layer.mixer.kv_heads == 1 for layer in ir.layers)
    ref_losses, ref_grads = reference_run(ir, dtype=torch.float64)
    losses, grads = launch(rank_run, 2, (ir, plan_from(world=2, tp=2), STEPS, torch.float64))[0]
    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) <= RTOL * abs(want), f"step {i}: loss {got} != {want}"
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        assert_close(grads[n], g, RTOL, f"gradient of {n}")


def test_tiny_hybrid_rank_bytes_equal_the_memory_model():
    ir = tiny_hybrid_splittable()
    plan = plan_from(world=2, tp=2)
    want = _predicted(ir, plan)
    assert all(got == want for got, _ in launch(_measure, 2, (ir, plan)))
