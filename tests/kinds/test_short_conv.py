"""The short_conv kind's pure facets: parameter count against transformers' Lfm2ShortConv, and the memory
and compute facets by hand from the formulas of ltmdsl/kinds/short_conv.py (exact integers)."""

from __future__ import annotations

import pytest
import sympy

import ltmdsl
from ltmdsl.kinds import kind_of
from ltmdsl.memory import cache_bytes, flops, report
from ltmdsl.memory.symbols import T


def model(layer: str, d_model: int = 64, stack: str = "x"):
    text = f"model m {{\n vocab = 2\n d_model = {d_model}\n layer x = {layer}\n stack {{ {stack} }}\n}}\n"
    return ltmdsl.loads(text).model


@pytest.mark.parametrize("kernel, bias", [(3, False), (3, True), (5, False)], ids=["lfm2", "bias", "L5"])
def test_count_equals_transformers(kernel, bias):
    pytest.importorskip("transformers")
    import torch
    from transformers.models.lfm2.modeling_lfm2 import Lfm2Config, Lfm2ShortConv

    ir = model(f"short_conv(kernel = {kernel}, bias = {str(bias).lower()})", d_model=48)
    conf = Lfm2Config(hidden_size=48, conv_L_cache=kernel, conv_bias=bias, num_hidden_layers=1, layer_types=["conv"],
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=8)
    with torch.device("meta"):
        hf = Lfm2ShortConv(conf, layer_idx=0)
    expected = sum(p.numel() for p in hf.parameters())
    assert ir.layers[0].params - 48 == expected  # minus the pre-norm's weight


def test_count_by_formula():
    d = 64
    assert model("short_conv()").layers[0].params - d == 3 * d * d + 3 * d + d * d
    assert model("short_conv(kernel = 4, bias = true)").layers[0].params - d == 3 * d * d + 4 * d + d * d + 5 * d


@pytest.mark.parametrize("conv_taps, taps", [("full", 3), ("minus_one", 2)])
def test_state_is_the_conv_taps_constant_in_context(conv_taps, taps):
    ir = model("short_conv()", d_model=1536, stack="repeat 10 { x }")
    for context in (1, 4096, 10**6):
        got = cache_bytes(ir, batch=3, context=context, kv_dtype="bf16", state_dtype="bf16", conv_taps=conv_taps)
        assert got == {"kv_cache": 0, "recurrent_state": 10 * 3 * 1536 * taps * 2}


def test_facets_by_hand():
    ir = model("short_conv(kernel = 3)", d_model=64)
    c = ir.layers[0].mixer
    kind = kind_of(c)
    f = kind.flops(c)["ssm"]
    assert f.per_token == 2 * 3 * 64 + 2 * 64 and sympy.simplify(f.prefill - (2 * 3 * 64 + 2 * 64) * T) == 0
    assert kind.dims(c) == "L=3 width=64"
    fl = flops(ir, 1000)
    assert fl["per_token"]["ssm"] == 512 and fl["prefill"]["ssm"] == 512 * 1000
    r = report(ir, None, context=10**6, state_dtype="fp32")
    assert r.by_kind["recurrent_state"]["short_conv/conv"] == 64 * 3 * 4  # one sequence (the default batch)
