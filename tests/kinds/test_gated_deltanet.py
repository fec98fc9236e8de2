"""The gated_deltanet kind's pure facets (ltmdsl/kinds/gated_deltanet.py): parameter count (by hand and equal to
transformers' Qwen3NextGatedDeltaNet at Qwen3-Next-80B-A3B's shape), cache bytes, O(1) growth in the context,
tensor-parallel split, FLOPs, `show` dims, and the memory report of the bundled example at 1M tokens, where the
state of its 36 Gated DeltaNet layers sits beside the KV cache of its 12 attention layers."""

from __future__ import annotations

import pytest
import sympy
from paths import EXAMPLES

import ltmdsl
from ltmdsl.commands import show
from ltmdsl.ir import NormConfig
from ltmdsl.kinds import REGISTRY, CheckError, ModelContext
from ltmdsl.memory import cache_bytes, flops, report, resolve
from ltmdsl.memory.symbols import B, C, T

KIND = REGISTRY["gated_deltanet"]
CTX = ModelContext(2048, NormConfig("rmsnorm", 1e-6))
# Qwen3-Next-80B-A3B's linear-attention layer (its config.json): 16 key heads, 32 value heads, dims 128, conv 4.
QWEN3_NEXT = dict(key_heads=16, value_heads=32, head_dim=128, v_head_dim=None, d_conv=4, conv_bias=False, chunk=64)


def build(**changes):
    return KIND.build({**QWEN3_NEXT, **changes}, CTX)


def one_layer(layer: str, d_model: int = 64) -> int:
    spec = ltmdsl.loads(f"model m {{\n vocab = 2\n d_model = {d_model}\n layer x = {layer}\n stack {{ x }}\n}}\n")
    return spec.model.layers[0].params - d_model  # minus the sub-layer's rmsnorm weight


def test_parameter_count_by_hand():
    # Hk=2, Hv=6, Dk=8, Dv=4, K=3, d=64: qkvz 64*(2*16 + 2*24), ba 64*12, conv 56*3 (+56 bias), dt_bias and A_log
    # 2*6, norm 4, out_proj 24*64
    expected = 64 * (32 + 48) + 64 * 12 + 56 * 3 + 12 + 4 + 24 * 64
    text = "gated_deltanet(key_heads = 2, value_heads = 6, head_dim = 8, v_head_dim = 4, d_conv = 3"
    assert one_layer(text + ")") == expected
    assert one_layer(text + ", conv_bias = true)") == expected + 56


def test_parameter_count_equals_transformers_at_qwen3_next_shape():
    """transformers' module built on the meta device (no memory) at Qwen3-Next-80B-A3B's dims."""
    torch = pytest.importorskip("torch")
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    from transformers import Qwen3NextConfig

    hc = Qwen3NextConfig(hidden_size=2048, linear_num_key_heads=16, linear_num_value_heads=32,
                         linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                         num_hidden_layers=1, layer_types=["linear_attention"])
    with torch.device("meta"):
        hf = qwen3_next.Qwen3NextGatedDeltaNet(hc, layer_idx=0)
    n = sum(p.numel() for p in hf.parameters())
    assert KIND.count(build(), 2048) == n == 33_718_464


def test_defaults():
    c = KIND.build({p.name: p.default for p in KIND.params} | {"key_heads": 4}, CTX)
    assert (c.key_heads, c.value_heads, c.head_dim, c.v_head_dim, c.d_conv, c.conv_bias, c.chunk) == \
        (4, 4, 128, 128, 4, False, 64)


@pytest.mark.parametrize("changes, param, message", [
    (dict(value_heads=24, key_heads=16), "value_heads", r"value_heads \(24\) must be a multiple of key_heads \(16\)"),
    (dict(chunk=48), "chunk", "chunk must be a power of two, got 48"),
    (dict(chunk=3), "chunk", "chunk must be a power of two, got 3"),
], ids=["value-heads-not-multiple", "chunk-48", "chunk-3"])
def test_checks_point_at_the_parameter(changes, param, message):
    with pytest.raises(CheckError, match=message) as err:
        build(**changes)
    assert err.value.param == param


def test_cache_bytes_at_qwen3_next_shape_are_constant_in_the_context():
    c = build()
    model = ltmdsl.loads(f"""model m {{
    vocab = 2
    d_model = 2048
    dtype = bf16
    layer x = gated_deltanet(key_heads = 16, value_heads = 32, head_dim = 128, d_conv = 4)
    stack {{ x }}
}}""").model
    assert model.layers[0].mixer == c
    for context in (1, 4096, 10**6):
        got = cache_bytes(model, batch=3, context=context, kv_dtype="bf16", state_dtype="bf16")
        # conv taps: 3 * (2*16*128 + 32*128) * 4 * 2 bytes; delta state: 3 * 32 * 128 * 128 * 2 bytes
        assert got == {"kv_cache": 0, "recurrent_state": 3 * 8192 * 4 * 2 + 3 * 32 * 128 * 128 * 2}
    minus_one = cache_bytes(model, batch=1, context=10, kv_dtype="bf16", state_dtype="fp32", conv_taps="minus_one")
    assert minus_one["recurrent_state"] == 8192 * 3 * 4 + 32 * 128 * 128 * 4
    s = resolve(model, None)
    for term in KIND.cache(c, s):
        assert not term.bytes.has(T), f"{term.part} grows with T"


def test_tensor_parallel_splits_whole_key_heads():
    c = build()
    assert KIND.split(c, 2048).tp == (("key heads", 16),)
    model = ltmdsl.loads("""model m {
    vocab = 2
    d_model = 2048
    dtype = bf16
    layer x = gated_deltanet(key_heads = 16, value_heads = 32)
    stack { x }
}""").model
    one, four = resolve(model, None), resolve(model, None, tp=4, gpus=4)
    for t1, t4 in zip(KIND.cache(c, one), KIND.cache(c, four)):
        assert sympy.simplify(t1.bytes - 4 * t4.bytes) == 0, t1.part


def test_flops():
    c = build()
    f = KIND.flops(c)["ssm"]
    conv = 2 * 8192 * 4
    assert f.per_token == 7 * 32 * 128 * 128 + conv
    # prefill of T >= chunk tokens: per token and value head 4*L*Dk + L*(Dk + Dv) + 2*L*Dv + 6*Dk*Dv, L = 64
    per_tok = 32 * (4 * 64 * 128 + 64 * 256 + 2 * 64 * 128 + 6 * 128 * 128) + conv
    assert f.prefill.subs(T, 4096) == per_tok * 4096
    short = 32 * (4 * 10 * 128 + 10 * 256 + 2 * 10 * 128 + 6 * 128 * 128) + conv  # T = 10 < chunk: L = T
    assert f.prefill.subs(T, 10) == short * 10


def test_workspace_and_stored_activations():
    c = build()
    model = ltmdsl.loads("""model m {
    vocab = 2
    d_model = 2048
    dtype = bf16
    layer x = gated_deltanet(key_heads = 16, value_heads = 32)
    stack { x }
}""").model
    s = resolve(model, None)
    ws = KIND.workspace(c, 2048, s).subs({T: 10**6, B: 1, C: 128})
    conv_dim, vd, hv = 8192, 4096, 32
    S, Xk, Q = 4 * hv * 128 * 128, 4 * hv * 64 * 128, 4 * hv * 64 * 64  # a state, [C, Dk], [C, C] in fp32
    # two chunks of 64: the rule's moment, q k v, z b a and o in bf16, g and beta in fp32, the chunk working set
    # with four states (the fp32 copy of the bf16 cache, the previous state, the next one and k^T d)
    rule = 2 * 128 * (conv_dim + vd + 2 * hv + vd) + 8 * 128 * hv + 4 * S + 8 * Xk + 2 * Q + 4 * hv * 64 + 64 * 64
    assert ws == rule
    # a prefill chunk of 2048: the conv's moment, its input, padded input, output and silu, beside z, b, a
    conv = 2 * 2048 * (4 * conv_dim + vd + 2 * hv) + 2 * 3 * conv_dim
    assert KIND.workspace(c, 2048, s).subs({T: 10**6, B: 1, C: 2048}) == conv
    from ltmdsl.memory.activations import MicroBatch

    x = MicroBatch(model, s)
    full, selective = KIND.stored(c, x, False), KIND.stored(c, x, True)
    assert full == selective  # the rule already recomputes its internals: selective has nothing left to drop
    kept = 2 * x.tok * 2 * conv_dim + 2 * x.b * (x.s + 3) * conv_dim + 2 * x.tok * 3 * vd + 4 * x.tok * hv * 5
    assert sympy.simplify(full - x.base - kept) == 0


def test_show_prints_the_dims():
    model = ltmdsl.load(EXAMPLES / "gdn-hybrid.ltm").model
    table = show.table(model)
    assert "gated_deltanet" in table and "Hk=16 Hv=32 Dk=128 Dv=128 K=4 C=64" in table


# ---- the example: a Qwen3-Next-shaped hybrid at 1M tokens ---------------------------------------------

def test_example_layout_and_count():
    model = ltmdsl.load(EXAMPLES / "gdn-hybrid.ltm").model
    mixers = [layer.kind for layer in model.layers if not layer.is_ffn]
    assert mixers == ["gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"] * 12
    assert len(model.layers_of("gated_deltanet")) == 36 and len(model.layers_of("attention")) == 12
    gdn = 2048 * (2 * 2048 + 2 * 4096) + 2048 * 64 + 8192 * 4 + 64 + 128 + 4096 * 2048
    attention = 2048 * 16 * 256 + 2 * 2048 * 2 * 256 + 16 * 256 * 2048 + 2 * 256
    mlp = 3 * 2048 * 5632
    norms = 96 * 2048 + 2048
    assert model.params_total == 36 * gdn + 12 * attention + 48 * mlp + norms + 2 * 151936 * 2048


def test_example_memory_at_1m_shows_the_state_beside_the_kv_cache():
    model = ltmdsl.load(EXAMPLES / "gdn-hybrid.ltm").model
    r = report(model, None, context=10**6, batch=1)
    # 12 attention layers: 2 KV heads * (256 + 256) * 1M tokens * 2 bytes (bf16)
    assert r.by_kind["kv_cache"] == {"attention": 12 * 2 * 512 * 10**6 * 2}
    # 36 Gated DeltaNet layers: 32 * 128 * 128 state values and (2*2048 + 4096) * 4 conv taps, bf16
    assert r.by_kind["recurrent_state"] == {"gated_deltanet/conv": 36 * 8192 * 4 * 2,
                                            "gated_deltanet/delta": 36 * 32 * 128 * 128 * 2}
    assert r.growth["recurrent_state"] == "O(1)" and r.growth["kv_cache"] == "O(T)"
    rows = {line.split()[0]: line for line in r.to_text().splitlines() if line.strip()}
    assert "O(1)" in rows["recurrent_state"] and "O(T)" in rows["kv_cache"]
    at_1k = report(model, None, context=1000, batch=1)
    assert at_1k.by_kind["recurrent_state"] == r.by_kind["recurrent_state"]
    f = flops(model, 10**6)
    assert 0 < f["per_token"]["ssm"] < f["per_token"]["attention"]
