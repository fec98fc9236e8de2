"""The rg_lru kind's pure facets: parameter count against transformers' RecurrentGemmaRecurrentBlock, and the
memory and compute facets by hand from the formulas of ltmdsl/kinds/rg_lru.py (exact integers)."""

from __future__ import annotations

import pytest
import sympy

import ltmdsl
from ltmdsl.kinds import kind_of
from ltmdsl.memory import cache_bytes, flops
from ltmdsl.memory.symbols import T


def model(layer: str, d_model: int = 64, stack: str = "x"):
    text = f"model m {{\n vocab = 2\n d_model = {d_model}\n layer x = {layer}\n stack {{ {stack} }}\n}}\n"
    return ltmdsl.loads(text).model


@pytest.mark.parametrize("heads, width, d_conv", [(4, None, 4), (2, 96, 3)], ids=["width-d", "wider-K3"])
def test_count_equals_transformers(heads, width, d_conv):
    pytest.importorskip("transformers")
    import torch
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import (
        RecurrentGemmaConfig, RecurrentGemmaRecurrentBlock,
    )

    w = "" if width is None else f", width = {width}"
    ir = model(f"rg_lru(heads = {heads}{w}, d_conv = {d_conv})", d_model=64)
    conf = RecurrentGemmaConfig(hidden_size=64, lru_width=width, num_attention_heads=heads, conv1d_width=d_conv,
                                num_hidden_layers=1, vocab_size=8)
    with torch.device("meta"):
        hf = RecurrentGemmaRecurrentBlock(conf, layer_idx=0)
    assert ir.layers[0].params - 64 == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("conv_taps, taps", [("full", 4), ("minus_one", 3)])
def test_state_is_conv_taps_and_h_constant_in_context(conv_taps, taps):
    ir = model("rg_lru(heads = 10)", d_model=2560, stack="repeat 18 { x }")
    for context in (1, 4096, 10**6):
        got = cache_bytes(ir, batch=2, context=context, kv_dtype="bf16", state_dtype="fp32", conv_taps=conv_taps)
        assert got == {"kv_cache": 0, "recurrent_state": 18 * 2 * 2560 * (taps + 1) * 4}


def test_facets_by_hand():
    c = model("rg_lru(heads = 4, d_conv = 4)").layers[0].mixer
    kind = kind_of(c)
    f = kind.flops(c)["ssm"]
    assert f.per_token == 2 * 64 * 4 + 8 * 64 and sympy.simplify(f.prefill - f.per_token * T) == 0
    assert kind.dims(c) == "W=64 H=4 K=4 gelu_tanh"
    assert kind.split(c, 64).tp == (("RG-LRU gate blocks", 4),)
    assert flops(model("rg_lru(heads = 4)"), 100)["prefill"]["ssm"] == (2 * 64 * 4 + 8 * 64) * 100
