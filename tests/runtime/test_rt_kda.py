"""The kda sub-layer (runtime/kinds/kda.py) against transformers' KimiDeltaAttention and against itself
(prefill + steps, chunked vs one-shot, batch vs per-sequence, the token-loop oracle), plus its parameter count.

Tolerances: EXACT = 1e-12 against transformers' module with its internal fp32 casts lifted to float64
(`transformers_in_float64`; measured ~3e-15). HF_TOL = 5e-6 against the module as shipped, run in float64
with our weights: its forget gate, gated RMSNorm and chunked KDA compute in fp32 even in a float64 module, and
that cast alone gives the measured 1.6e-6 to 1.9e-6 (our own fp32 path is 5e-7 to 9e-7 from float64 on the same
inputs). 1e-10 for our own float64 forms against each other; 1e-12 for batch vs per-sequence.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rel_err
from test_rt_gated_deltanet import transformers_in_float64

import ltmdsl
from ltmdsl.ir import NormConfig
from ltmdsl.kinds import REGISTRY, ModelContext
from ltmdsl.memory import cache_bytes
from ltmdsl.runtime.build import build
from ltmdsl.runtime.cache import CacheRequest
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds.kda import KDA, new_cache, state_names
from ltmdsl.units import DTYPES

F64 = torch.float64
D_MODEL = 32
EPS = 1e-6
HF_TOL = 5e-6
EXACT = 1e-12
KIND = REGISTRY["kda"]


def config(heads=2, head_dim=8, d_conv=4, conv_bias=False, chunk=8):
    values = dict(heads=heads, head_dim=head_dim, d_conv=d_conv, conv_bias=conv_bias, chunk=chunk)
    return KIND.build(values, ModelContext(D_MODEL, NormConfig("rmsnorm", EPS)))


def layer(cfg, kernels=TORCH_KERNELS, seed=0):
    """Our module in float64, seeded init, with the norm weight moved off 1 and the conv off its tiny init."""
    module = KDA(cfg, D_MODEL, EPS, kernels)
    gen = torch.Generator().manual_seed(seed)
    module.init_weights(gen)
    module = module.double().eval()
    with torch.no_grad():
        module.o_norm.weight.add_(0.3 * torch.randn(cfg.head_dim, generator=gen, dtype=F64))
        module.conv1d.weight.mul_(20)  # 0.02 conv weights would make the conv output all but zero
        for lin in (module.q_proj, module.k_proj, module.v_proj, module.g_a_proj, module.g_b_proj, module.b_proj):
            lin.weight.mul_(10)  # gates and beta away from their midpoints, so the comparison covers them
    return module


def hidden(T=37, B=2, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=F64)


def fresh_state(cfg, B, taps="full"):
    return new_cache(cfg, CacheRequest(B, 64, F64, F64, taps, "cpu"))


# ---- against transformers ---------------------------------------------------------------------------

def hf_layer(cfg, ours: KDA):
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    hc = KimiLinearConfig(
        hidden_size=D_MODEL, linear_num_heads=cfg.heads, linear_head_dim=cfg.head_dim,
        linear_conv_kernel_dim=cfg.d_conv, rms_norm_eps=EPS, hidden_act="silu", num_hidden_layers=1,
        layer_types=["linear_attention"], vocab_size=16, intermediate_size=8,
    )
    hf = kimi.KimiLinearDeltaAttention(hc, layer_idx=0).double().eval()
    hf.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    return hf


@pytest.mark.parametrize("heads,head_dim", [(2, 8), (3, 4)], ids=["H2-D8", "H3-D4"])
@pytest.mark.parametrize("T", [1, 37, 70])
def test_matches_transformers(heads, head_dim, T):
    """T = 70 crosses transformers' chunk of 64 (ours is 8 here), so both chunked forms carry a state."""
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    cfg = config(heads=heads, head_dim=head_dim, chunk=8)
    ours = layer(cfg)
    hf = hf_layer(cfg, ours)
    x = hidden(T)
    with torch.no_grad():
        y = ours(x)
        assert_close(y, hf(x), HF_TOL, "vs KimiLinearDeltaAttention as shipped (fp32 inside)")
        with transformers_in_float64(kimi):
            assert_close(y, hf(x), EXACT, "vs KimiLinearDeltaAttention in float64 throughout")


def test_parameter_count_equals_transformers():
    cfg = config(heads=3, head_dim=4, d_conv=3)
    ours = KDA(cfg, D_MODEL, EPS, TORCH_KERNELS)
    hf = hf_layer(cfg, ours)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert KIND.count(cfg, D_MODEL) == n_hf == sum(p.numel() for p in ours.parameters())
    assert sorted(ours.state_dict()) == sorted(state_names(cfg)) == sorted(hf.state_dict())


def test_the_decay_is_per_channel():
    """Replacing the per-channel decay by its mean over the channels changes the output: the layer really uses
    one decay per key channel (the transformers comparison above then covers that path)."""
    cfg = config()
    ours = layer(cfg)
    x = hidden(21)
    with torch.no_grad():
        y = ours(x)
        gate = ours.forget_gate
        per_channel = gate.forward
        gate.forward = lambda u: per_channel(u).mean(-1, keepdim=True).expand(*u.shape[:-1], cfg.heads, cfg.head_dim)
        y_mean = ours(x)
    assert rel_err(y_mean, y) > 1e-3


# ---- against itself -----------------------------------------------------------------------------------

@pytest.mark.parametrize("taps", ["full", "minus_one"])
@pytest.mark.parametrize("k_steps", [1, 4])
def test_prefill_then_steps_equals_prefill(taps, k_steps):
    cfg = config(chunk=8)
    ours = layer(cfg)
    T = 21
    x = hidden(T)
    with torch.no_grad():
        full_state = fresh_state(cfg, 2, taps)
        y = ours(x, full_state)
        state = fresh_state(cfg, 2, taps)
        parts = [ours(x[:, : T - k_steps], state)]
        for t in range(T - k_steps, T):
            parts.append(ours.step(x[:, t], state, t)[:, None])
    assert_close(torch.cat(parts, dim=1), y, 1e-10, "prefill + steps")
    assert_close(state.delta, full_state.delta, 1e-10, "delta state")
    assert_close(state.conv, full_state.conv, 1e-12, "conv taps")


@pytest.mark.parametrize("split_at", [1, 8, 13])
def test_chunked_prefill_equals_one_shot(split_at):
    cfg = config(chunk=4)
    ours = layer(cfg)
    x = hidden(19)
    with torch.no_grad():
        y = ours(x)
        state = fresh_state(cfg, 2)
        y2 = torch.cat([ours(x[:, :split_at], state), ours(x[:, split_at:], state)], dim=1)
    assert_close(y2, y, 1e-10, "two prefills vs one")


def test_chunk_length_does_not_change_the_output():
    outs = []
    for chunk in (2, 16, 64):
        with torch.no_grad():
            outs.append(layer(config(chunk=chunk))(hidden(23)))
    assert_close(outs[0], outs[2], 1e-10, "chunk 2 vs 64")
    assert_close(outs[1], outs[2], 1e-10, "chunk 16 vs 64")


def test_batch_equals_per_sequence():
    cfg = config()
    ours = layer(cfg)
    x = hidden(17, B=3)
    with torch.no_grad():
        y = ours(x)
        for b in range(3):
            assert_close(y[b : b + 1], ours(x[b : b + 1]), 1e-12, f"sequence {b}")


def test_reference_kernels_give_the_token_loop_result():
    cfg = config(chunk=4)
    fast, slow = layer(cfg, TORCH_KERNELS), layer(cfg, REFERENCE_KERNELS)
    x = hidden(15)
    with torch.no_grad():
        assert_close(fast(x), slow(x), 1e-10, "chunked vs token loop")


# ---- the model ----------------------------------------------------------------------------------------

SPEC = """
model kda_tiny {
    vocab = 40
    d_model = 32
    dtype = fp32
    layer kda = kda(heads = 2, head_dim = 8, d_conv = 3, chunk = 8)
    layer attn = attention(heads = 4, kv_heads = 2)
    layer ffn = mlp(d_ff = 48)
    stack { kda ffn kda ffn attn ffn }
}
"""


@pytest.mark.parametrize("taps", ["full", "minus_one"])
def test_model_cache_bytes_equal_memory_model(taps):
    ir = ltmdsl.loads(SPEC).model
    model = build(ir, init=False)
    cache = model.new_cache(2, 30, dtype=torch.float32, conv_taps=taps, state_dtype=torch.bfloat16)
    predicted = cache_bytes(ir, batch=2, context=30, kv_dtype=DTYPES["fp32"], state_dtype=DTYPES["bf16"],
                            conv_taps=taps)
    assert cache.breakdown() == predicted
    taps_n = 3 if taps == "full" else 2
    assert predicted["recurrent_state"] == 2 * 2 * (48 * taps_n + 2 * 8 * 8) * 2  # layers * B * (...) * bf16


def test_model_decode_equals_prefill():
    ir = ltmdsl.loads(SPEC).model
    model = build(ir).double().eval()
    ids = torch.randint(0, 40, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 14, dtype=F64)
        parts = [model(ids[:, :10], cache)] + [model(ids[:, t : t + 1], cache) for t in range(10, 14)]
    assert_close(torch.cat(parts, dim=1), full, 1e-10, "prefill 10 + 4 steps vs prefill 14")


def test_training_gradients_flow_through_every_parameter():
    model = build(ltmdsl.loads(SPEC).model)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(6))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    for name, p in model.named_parameters():
        if "layers.0.mixer." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name



def test_fp32_against_float64():
    """The layer in fp32 (gates, norm and the rule in fp32 inside) against itself in float64, prefill and
    decode, 1e-4 relative."""
    cfg = config(chunk=8)
    ref = layer(cfg)
    low = KDA(cfg, D_MODEL, EPS, TORCH_KERNELS).float()
    low.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = hidden(19)
    with torch.no_grad():
        assert_close(low(x.float()), ref(x), 1e-4, "fp32 prefill")
        s_ref = fresh_state(cfg, 2)
        s_low = new_cache(cfg, CacheRequest(2, 64, torch.float32, torch.float32, "full", "cpu"))
        ref(x[:, :18], s_ref), low(x[:, :18].float(), s_low)
        assert_close(low.step(x[:, 18].float(), s_low, 18), ref.step(x[:, 18], s_ref, 18), 1e-4, "fp32 step")


def test_bf16_model_against_fp32():
    """The hybrid in bf16 against the fp32 model with the same weights, prefill then decode, bf16 <= 1e-2 on
    the logits as for every model (tests/runtime/test_rt_low_precision.py)."""
    spec = ltmdsl.loads(SPEC)
    ids = torch.randint(0, 40, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ltmdsl.build(spec, dtype=torch.float32, seed=0)(ids)  # [B, T, V]
        model = ltmdsl.build(spec, dtype=torch.bfloat16, seed=0)
        cache = model.new_cache(2, 24)
        out = [model(ids[:, :20], cache)] + [model(ids[:, t : t + 1], cache) for t in range(20, 24)]
    assert_close(torch.cat(out, dim=1).float(), ref, 1e-2, "bf16 prefill + decode vs fp32")
