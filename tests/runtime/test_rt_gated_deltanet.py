"""The gated_deltanet sub-layer (runtime/kinds/gated_deltanet.py) against transformers' Qwen3NextGatedDeltaNet
and against itself (prefill + steps, chunked vs one-shot, batch vs per-sequence, the token-loop oracle).

Tolerances: HF_TOL = 1e-6 against transformers run in float64 with our weights (its gated RMSNorm and its
delta-rule functions compute in fp32 even in a float64 module; the gap is that cast, measured <= 2.7e-7);
EXACT = 1e-12 against the same transformers module with those fp32 casts lifted to float64
(`transformers_in_float64`), where only the association of sums differs; 1e-10 for our own float64 forms
against each other (same math, different association); 1e-12 for batch vs per-sequence.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from helpers import assert_close

import ltmdsl
from ltmdsl.kinds import REGISTRY, ModelContext
from ltmdsl.ir import NormConfig
from ltmdsl.memory import cache_bytes
from ltmdsl.runtime.build import build
from ltmdsl.runtime.kernels import REFERENCE_KERNELS, TORCH_KERNELS
from ltmdsl.runtime.kinds.gated_deltanet import GatedDeltaNet, new_cache, state_names
from ltmdsl.runtime.cache import CacheRequest
from ltmdsl.units import DTYPES

F64 = torch.float64
D_MODEL = 32
EPS = 1e-6
HF_TOL = 1e-6
KIND = REGISTRY["gated_deltanet"]


def config(key_heads=2, value_heads=4, head_dim=8, v_head_dim=6, d_conv=4, conv_bias=False, chunk=8):
    values = dict(key_heads=key_heads, value_heads=value_heads, head_dim=head_dim, v_head_dim=v_head_dim,
                  d_conv=d_conv, conv_bias=conv_bias, chunk=chunk)
    return KIND.build(values, ModelContext(D_MODEL, NormConfig("rmsnorm", EPS)))


def layer(cfg, kernels=TORCH_KERNELS, seed=0):
    """Our module in float64, seeded init, with A_log / dt_bias / norm / conv bias moved off their init values."""
    module = GatedDeltaNet(cfg, D_MODEL, EPS, kernels)
    gen = torch.Generator().manual_seed(seed)
    module.init_weights(gen)
    module = module.double().eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("dt_bias", "norm.weight", "conv1d.bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
            if name == "conv1d.weight":  # 0.02 conv weights would make the conv all but the identity of zero
                p.mul_(20)
    return module


def hidden(T=37, B=2, seed=1):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=F64)


def fresh_state(cfg, B, taps="full"):
    return new_cache(cfg, CacheRequest(B, 64, F64, F64, taps, "cpu"))


# ---- against transformers ---------------------------------------------------------------------------

EXACT = 1e-12


class _Float64Torch(types.ModuleType):
    """`torch` as a transformers modelling module sees it, with `torch.float32` meaning float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@contextlib.contextmanager
def transformers_in_float64(module):
    """Run a transformers modelling module with its internal fp32 casts (`.to(torch.float32)`, `.float()`)
    made float64, so its math can be compared with ours at rounding level. Scoped to the `with` block."""
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(module, "torch", _Float64Torch("torch"))
        mp.setattr(torch.Tensor, "float", lambda self, *args, **kwargs: self.to(torch.float64))
        yield
    finally:
        mp.undo()


def hf_layer(cfg, ours: GatedDeltaNet):
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    from transformers import Qwen3NextConfig

    hc = Qwen3NextConfig(
        hidden_size=D_MODEL, linear_num_key_heads=cfg.key_heads, linear_num_value_heads=cfg.value_heads,
        linear_key_head_dim=cfg.head_dim, linear_value_head_dim=cfg.v_head_dim, linear_conv_kernel_dim=cfg.d_conv,
        rms_norm_eps=EPS, hidden_act="silu", num_hidden_layers=1, layer_types=["linear_attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=16, intermediate_size=8,
    )
    hf = qwen3_next.Qwen3NextGatedDeltaNet(hc, layer_idx=0).double().eval()
    hf.load_state_dict(ours.state_dict(), strict=True)  # same names, same layouts
    return hf


@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(2, 2, 8, 8), (2, 4, 8, 6), (1, 4, 4, 8)], ids=["hv=hk", "gva2", "gva4"])
@pytest.mark.parametrize("T", [1, 37])
def test_matches_transformers(Hk, Hv, Dk, Dv, T):
    cfg = config(key_heads=Hk, value_heads=Hv, head_dim=Dk, v_head_dim=Dv, chunk=64)
    ours = layer(cfg)
    hf = hf_layer(cfg, ours)
    x = hidden(T)
    with torch.no_grad():
        assert_close(ours(x), hf(x), HF_TOL, "vs Qwen3NextGatedDeltaNet")


@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(2, 4, 8, 6), (1, 4, 4, 8)], ids=["gva2", "gva4"])
def test_matches_transformers_without_its_fp32_casts(Hk, Hv, Dk, Dv):
    """The same comparison at rounding level: transformers' module with its fp32 casts lifted to float64.
    T = 70 crosses transformers' chunk of 64 (ours is 8 here), so both chunked forms carry a state."""
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    cfg = config(key_heads=Hk, value_heads=Hv, head_dim=Dk, v_head_dim=Dv, chunk=8)
    ours = layer(cfg)
    hf = hf_layer(cfg, ours)
    x = hidden(70)
    with torch.no_grad():
        y = ours(x)
        with transformers_in_float64(qwen3_next):
            ref = hf(x)
    assert_close(y, ref, EXACT, "vs Qwen3NextGatedDeltaNet in float64 throughout")


def test_parameter_count_equals_transformers():
    cfg = config(key_heads=2, value_heads=6, head_dim=8, v_head_dim=4, d_conv=3)
    ours = GatedDeltaNet(cfg, D_MODEL, EPS, TORCH_KERNELS)
    hf = hf_layer(cfg, ours)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert KIND.count(cfg, D_MODEL) == n_hf == sum(p.numel() for p in ours.parameters())
    assert sorted(ours.state_dict()) == sorted(state_names(cfg)) == sorted(hf.state_dict())


def test_transformers_comparison_can_fail():
    """The gate matters: a wrong z (silu dropped) is far outside HF_TOL, so the parity test has teeth."""
    cfg = config()
    ours = layer(cfg)
    hf = hf_layer(cfg, ours)
    x = hidden(9)
    with torch.no_grad():
        ref = hf(x)
        ours.norm.weight.mul_(1.01)
        with pytest.raises(AssertionError, match="relative error"):
            assert_close(ours(x), ref, HF_TOL, "perturbed norm")


# ---- against itself -----------------------------------------------------------------------------------

@pytest.mark.parametrize("taps", ["full", "minus_one"])
@pytest.mark.parametrize("k_steps", [1, 4])
def test_prefill_then_steps_equals_prefill(taps, k_steps):
    """prefill(T) == prefill(T - k) then k one-token steps: outputs and the whole state (conv taps, delta)."""
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
    """Prefill in two calls through the cache == one call == no cache at all."""
    cfg = config(chunk=4)
    ours = layer(cfg)
    x = hidden(19)
    with torch.no_grad():
        y = ours(x)
        state = fresh_state(cfg, 2)
        y2 = torch.cat([ours(x[:, :split_at], state), ours(x[:, split_at:], state)], dim=1)
    assert_close(y2, y, 1e-10, "two prefills vs one")


def test_chunk_length_does_not_change_the_output():
    """chunk 2, 8 and 64 (longer than T) give the same layer output: the chunk is an implementation choice."""
    outs = []
    for chunk in (2, 8, 64):
        with torch.no_grad():
            outs.append(layer(config(chunk=chunk))(hidden(23)))
    assert_close(outs[0], outs[2], 1e-10, "chunk 2 vs 64")
    assert_close(outs[1], outs[2], 1e-10, "chunk 8 vs 64")


def test_batch_equals_per_sequence():
    cfg = config()
    ours = layer(cfg)
    x = hidden(17, B=3)
    with torch.no_grad():
        y = ours(x)
        for b in range(3):
            assert_close(y[b : b + 1], ours(x[b : b + 1]), 1e-12, f"sequence {b}")


def test_reference_kernels_give_the_token_loop_result():
    """The same weights on the oracle bundle (token-loop delta rule, plain conv) agree with the chunked form."""
    cfg = config(chunk=4)
    fast, slow = layer(cfg, TORCH_KERNELS), layer(cfg, REFERENCE_KERNELS)
    x = hidden(15)
    with torch.no_grad():
        assert_close(fast(x), slow(x), 1e-10, "chunked vs token loop")


# ---- the model: cache bytes, decode -------------------------------------------------------------------

SPEC = """
model gdn_tiny {
    vocab = 40
    d_model = 32
    dtype = fp32
    layer gdn = gated_deltanet(key_heads = 2, value_heads = 4, head_dim = 8, v_head_dim = 6, d_conv = 3,
                               chunk = 8)
    layer attn = attention(heads = 4, kv_heads = 2)
    layer ffn = mlp(d_ff = 48)
    stack { gdn ffn gdn ffn attn ffn }
}
"""


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("taps", ["full", "minus_one"])
def test_model_cache_bytes_equal_memory_model(state_dtype, taps):
    ir = ltmdsl.loads(SPEC).model
    model = build(ir, init=False)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
    cache = model.new_cache(3, 50, dtype=torch.float32, conv_taps=taps, state_dtype=torch_dtype)
    predicted = cache_bytes(ir, batch=3, context=50, kv_dtype=DTYPES["fp32"], state_dtype=DTYPES[state_dtype],
                            conv_taps=taps)
    assert cache.breakdown() == predicted
    conv_dim, taps_n = 2 * 16 + 24, 3 if taps == "full" else 2
    per_layer = 3 * (conv_dim * taps_n + 4 * 8 * 6) * DTYPES[state_dtype].bytes  # B * (conv taps + Hv*Dk*Dv)
    assert predicted["recurrent_state"] == 2 * per_layer


def test_model_decode_equals_prefill():
    """The whole hybrid in float64: prefill then greedy-style decode steps give the logits of one prefill."""
    ir = ltmdsl.loads(SPEC).model
    model = build(ir).double().eval()
    ids = torch.randint(0, 40, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 14, dtype=F64)
        parts = [model(ids[:, :10], cache)] + [model(ids[:, t : t + 1], cache) for t in range(10, 14)]
    assert_close(torch.cat(parts, dim=1), full, 1e-10, "prefill 10 + 4 steps vs prefill 14")


def test_training_gradients_flow_through_every_parameter():
    ir = ltmdsl.loads(SPEC).model
    model = build(ir)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(6))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    for name, p in model.named_parameters():
        if ".mixer." in name and "layers.0." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_triton_back_end_runs_the_generated_delta_rule(monkeypatch, tmp_path):
    """backend="triton" runs the delta rule, the norms and the conv on generated kernels (provider "triton"),
    and the logits match backend="torch" (the kernels' own tests: tests/codegen/test_kernels.py)."""
    monkeypatch.setenv("LTMDSL_CACHE_DIR", str(tmp_path))
    spec = ltmdsl.loads(SPEC)
    ref = ltmdsl.build(spec, backend="torch", seed=0)
    fast = ltmdsl.build(spec, backend="triton", seed=0)
    k = fast.layers[0].mixer.kernels
    assert k.provider("gated_delta_chunked") == "triton" and k.provider("gated_delta_step") == "triton"
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(fast(ids), ref(ids), 1e-4, "prefill logits (fp32)")
        c_ref, c_fast = ref.new_cache(1, 10), fast.new_cache(1, 10)
        fast(ids, c_fast), ref(ids, c_ref)
        assert_close(fast(ids[:, :1], c_fast), ref(ids[:, :1], c_ref), 1e-4, "decode logits (fp32)")



def test_fp32_against_float64():
    """The layer in fp32 (gates, norm and the rule in fp32 inside) against itself in float64, prefill and
    decode, 1e-4 relative."""
    cfg = config(chunk=8)
    ref = layer(cfg)
    low = GatedDeltaNet(cfg, D_MODEL, EPS, TORCH_KERNELS).float()
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
