"""The mlstm kind's pure facets: parameter count against transformers' xLSTMLayer, and the memory and compute
facets by hand from the formulas of ltmdsl/kinds/mlstm.py (exact integers)."""

from __future__ import annotations

import pytest
import sympy

import ltmdsl
from ltmdsl.kinds import kind_of
from ltmdsl.memory import cache_bytes
from ltmdsl.memory.symbols import T


def model(layer: str, d_model: int = 64, stack: str = "x"):
    text = f"model m {{\n vocab = 2\n d_model = {d_model}\n layer x = {layer}\n stack {{ {stack} }}\n}}\n"
    return ltmdsl.loads(text).model


@pytest.mark.parametrize("args, qk_factor, v_factor, bias", [
    ("heads = 4", 0.5, 1.0, False),
    ("heads = 2, qk_dim = 64, v_dim = 128, bias = true", 1.0, 2.0, True),
], ids=["xlstm-7b-shape", "wide-bias"])
def test_count_equals_transformers(args, qk_factor, v_factor, bias):
    pytest.importorskip("transformers")
    import torch
    from transformers.models.xlstm.modeling_xlstm import xLSTMConfig, xLSTMLayer

    ir = model(f"mlstm({args})", d_model=64)
    heads = ir.layers[0].mixer.heads
    conf = xLSTMConfig(hidden_size=64, num_heads=heads, qk_dim_factor=qk_factor, v_dim_factor=v_factor,
                       use_bias=bias, weight_mode="single", num_hidden_layers=1, vocab_size=8)
    with torch.device("meta"):
        hf = xLSTMLayer(conf)
    assert ir.layers[0].params - 64 == sum(p.numel() for p in hf.parameters())


def test_state_is_c_n_m_constant_in_context():
    ir = model("mlstm(heads = 8, qk_dim = 2048, v_dim = 4096)", d_model=4096, stack="repeat 32 { x }")
    for context in (1, 4096, 10**6):
        got = cache_bytes(ir, batch=3, context=context, kv_dtype="bf16", state_dtype="fp32")
        assert got == {"kv_cache": 0, "recurrent_state": 32 * 3 * 8 * (256 * 512 + 256 + 1) * 4}


def test_facets_by_hand():
    c = model("mlstm(heads = 2, qk_dim = 16, v_dim = 32, chunk = 8)", d_model=32).layers[0].mixer
    kind = kind_of(c)
    f = kind.flops(c)["ssm"]
    assert f.per_token == 5 * 2 * 8 * 16 + 5 * 2 * 8
    # T = 20 in chunks of 8 (3 chunks)
    assert f.prefill.subs(T, 20) == (2 * 8 * 2 * 24 + 4 * 2 * 128 + 4 * 2 * 8) * 20 + 2 * 2 * (128 + 8) * 3
    assert kind.dims(c) == "H=2 Dqk=8 Dv=16 C=8 cap=15"
    assert kind.split(c, 32).tp == (("mLSTM heads", 2),)
    uncapped = model("mlstm(heads = 2, soft_cap = none)", d_model=32).layers[0].mixer
    assert uncapped.soft_cap is None and kind.dims(uncapped).endswith("uncapped")
    assert sympy.simplify(kind.flops(uncapped)["ssm"].per_token - 5 * 2 * 8 * 16 - 5 * 2 * 8) == 0
