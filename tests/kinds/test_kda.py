"""The kda kind's pure facets (ltmdsl/kinds/kda.py): parameter count (by hand and equal to transformers'
KimiDeltaAttention at Kimi-Linear-48B-A3B's shape), cache bytes constant in the context, tensor-parallel split,
FLOPs, the per-channel decay's extra workspace, `show` dims, and the bundled example's memory report."""

from __future__ import annotations

import pytest
import sympy
from paths import EXAMPLES

import ltmdsl
from ltmdsl.commands import show
from ltmdsl.ir import NormConfig
from ltmdsl.kinds import REGISTRY, CheckError, ModelContext
from ltmdsl.memory import cache_bytes, report, resolve
from ltmdsl.memory.symbols import B, C, T

KIND = REGISTRY["kda"]
GDN = REGISTRY["gated_deltanet"]
CTX = ModelContext(2304, NormConfig("rmsnorm", 1e-5))
# Kimi-Linear-48B-A3B's KDA layer (transformers' KimiLinearConfig defaults): 32 heads of 128, conv 4, d = 2304.
KIMI = dict(heads=32, head_dim=128, d_conv=4, conv_bias=False, chunk=64)
MODEL = """model m {
    vocab = 2
    d_model = 2304
    dtype = bf16
    layer x = kda(heads = 32)
    stack { x }
}"""


def build(**changes):
    return KIND.build({**KIMI, **changes}, CTX)


def one_layer(layer: str, d_model: int = 64) -> int:
    spec = ltmdsl.loads(f"model m {{\n vocab = 2\n d_model = {d_model}\n layer x = {layer}\n stack {{ x }}\n}}\n")
    return spec.model.layers[0].params - d_model  # minus the sub-layer's rmsnorm weight


def test_parameter_count_by_hand():
    # H=3, Dh=4, K=3, d=64: q, k, v 3*64*12; conv 36*3 (+36 bias); forget gate 64*4 + 4*12 + 12 + 3;
    # b_proj 64*3; output gate 64*4 + 4*12; o_norm 4; o_proj 12*64
    expected = 3 * 64 * 12 + 36 * 3 + (64 * 4 + 4 * 12 + 12 + 3) + 64 * 3 + (64 * 4 + 4 * 12) + 4 + 12 * 64
    assert one_layer("kda(heads = 3, head_dim = 4, d_conv = 3)") == expected
    assert one_layer("kda(heads = 3, head_dim = 4, d_conv = 3, conv_bias = true)") == expected + 36


def test_parameter_count_equals_transformers_at_kimi_linear_shape():
    torch = pytest.importorskip("torch")
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from transformers import KimiLinearConfig

    hc = KimiLinearConfig(num_hidden_layers=1, layer_types=["linear_attention"])  # its defaults: d 2304, 32 x 128
    with torch.device("meta"):
        hf = kimi.KimiLinearDeltaAttention(hc, layer_idx=0)
    n = sum(p.numel() for p in hf.parameters())
    assert KIND.count(build(), 2304) == n == 39_514_272


def test_defaults_and_checks():
    c = KIND.build({p.name: p.default for p in KIND.params} | {"heads": 4}, CTX)
    assert (c.heads, c.head_dim, c.d_conv, c.conv_bias, c.chunk) == (4, 128, 4, False, 64)
    with pytest.raises(CheckError, match="chunk must be a power of two, got 96") as err:
        build(chunk=96)
    assert err.value.param == "chunk"


def test_cache_bytes_are_constant_in_the_context():
    model = ltmdsl.loads(MODEL).model
    for context in (1, 4096, 10**6):
        got = cache_bytes(model, batch=2, context=context, kv_dtype="bf16", state_dtype="bf16")
        # conv taps: 2 * 3*32*128 * 4 * 2 bytes; delta state: 2 * 32 * 128 * 128 * 2 bytes
        assert got == {"kv_cache": 0, "recurrent_state": 2 * 12288 * 4 * 2 + 2 * 32 * 128 * 128 * 2}
    for term in KIND.cache(build(), resolve(model, None)):
        assert not term.bytes.has(T), f"{term.part} grows with T"


def test_tensor_parallel_splits_whole_heads():
    c = build()
    assert KIND.split(c, 2304).tp == (("heads", 32),)
    model = ltmdsl.loads(MODEL).model
    one, four = resolve(model, None), resolve(model, None, tp=4, gpus=4)
    for t1, t4 in zip(KIND.cache(c, one), KIND.cache(c, four)):
        assert sympy.simplify(t1.bytes - 4 * t4.bytes) == 0, t1.part


def test_flops_equal_gated_deltanet_of_the_same_shape():
    """The matmuls of the delta rule do not depend on how the decay is shaped: KDA with H heads of Dh counts as
    Gated DeltaNet with Hk = Hv = H and Dk = Dv = Dh (same conv width)."""
    gdn = GDN.build(dict(key_heads=32, value_heads=32, head_dim=128, v_head_dim=128, d_conv=4, conv_bias=False,
                         chunk=64), CTX)
    f, g = KIND.flops(build())["ssm"], GDN.flops(gdn)["ssm"]
    assert f.per_token == g.per_token == 7 * 32 * 128 * 128 + 2 * 12288 * 4
    assert sympy.simplify(f.prefill - g.prefill) == 0


def test_per_channel_decay_adds_its_fp32_log_decays_to_the_workspace():
    model = ltmdsl.loads(MODEL).model
    s = resolve(model, None)
    c = build()
    ws = KIND.workspace(c, 2304, s).subs({T: 10**6, B: 1, C: 64})
    h, dh, n = 32, 128, 64
    S, X, Q = 4 * h * dh * dh, 4 * h * n * dh, 4 * h * n * n  # a state, [C, Dh], [C, C] in fp32
    E = 4 * h * 16 * 16 * dh  # one exact [SUB, SUB, Dh] decay block
    # one chunk, at a diagonal block of the decayed scores: q k v and o in bf16, g [H, Dh] and beta in fp32,
    # the bf16 cache's fp32 state copy, [k; q] stacked, q and k per value head, v, the cumulative decay
    # (Dh per head and token), the two score matrices, the decay block and the einsum's two products
    rule = (2 * n * (3 * h * dh + h * dh) + 4 * n * h * (dh + 1)
            + S + 4 * X + X + 2 * Q + X + 3 * E + 2 * E // dh + 5 * n * n)
    assert ws == rule


def test_show_prints_the_dims():
    table = show.table(ltmdsl.load(EXAMPLES / "kda-hybrid.ltm").model)
    assert "H=32 Dh=128 K=4 C=64 per-channel decay" in table


def test_example_memory_at_1m():
    model = ltmdsl.load(EXAMPLES / "kda-hybrid.ltm").model
    assert len(model.layers_of("kda")) == 18 and len(model.layers_of("attention")) == 6
    r = report(model, None, context=10**6, batch=1)
    assert r.by_kind["kv_cache"] == {"attention": 6 * 8 * 256 * 10**6 * 2}
    assert r.by_kind["recurrent_state"] == {"kda/conv": 18 * 12288 * 4 * 2, "kda/delta": 18 * 32 * 128 * 128 * 2}
    assert r.growth["recurrent_state"] == "O(1)"
