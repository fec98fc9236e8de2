"""The lightning kind's pure facets: parameter count against transformers' MiniMaxLightningAttention, and
the memory and compute facets by hand from the formulas of ltmdsl/kinds/lightning.py (exact integers)."""

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


@pytest.mark.parametrize("heads, head_dim", [(4, None), (3, 32)], ids=["d-over-heads", "explicit-head-dim"])
def test_count_equals_transformers(heads, head_dim):
    pytest.importorskip("transformers")
    import torch
    from transformers.models.minimax.modeling_minimax import MiniMaxConfig, MiniMaxLightningAttention

    spec_dim = "" if head_dim is None else f", head_dim = {head_dim}"
    ir = model(f"lightning(heads = {heads}{spec_dim})", d_model=64)
    conf = MiniMaxConfig(hidden_size=64, num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
                         num_hidden_layers=2, layer_types=["linear_attention"] * 2, vocab_size=8)
    with torch.device("meta"):
        hf = MiniMaxLightningAttention(conf, layer_idx=0)
    assert ir.layers[0].params - 64 == sum(p.numel() for p in hf.parameters())


def test_count_without_gate():
    hd = 4 * 16
    assert model("lightning(heads = 4, gate = false)").layers[0].params - 64 == 3 * 64 * hd + hd * 64 + hd


def test_state_is_h_d_d_constant_in_context():
    ir = model("lightning(heads = 64, head_dim = 128)", d_model=6144, stack="repeat 7 { x }")
    for context in (1, 4096, 10**6):
        got = cache_bytes(ir, batch=2, context=context, kv_dtype="bf16", state_dtype="fp32")
        assert got == {"kv_cache": 0, "recurrent_state": 7 * 2 * 64 * 128 * 128 * 4}


def test_tensor_parallelism_splits_heads():
    ir = model("lightning(heads = 8, head_dim = 16)")
    r = report(ir, None, context=1000, tp=4, gpus=4, state_dtype="fp32")
    assert r.per_gpu_components["recurrent_state"] == 2 * 16 * 16 * 4  # 8 / 4 heads on each GPU
    assert kind_of(ir.layers[0].mixer).split(ir.layers[0].mixer, 64).tp == (("lightning heads", 8),)


def test_facets_by_hand():
    c = model("lightning(heads = 2, head_dim = 8, chunk = 16)", d_model=16).layers[0].mixer
    kind = kind_of(c)
    f = kind.flops(c)["ssm"]
    assert f.per_token == 5 * 2 * 8 * 8
    # T = 40, blocks of 16: per token 2*16*2*(8+8) + 4*2*8*8, plus 2*2*8*8 for each of 3 blocks
    assert f.prefill.subs(T, 40) == (2 * 16 * 2 * 16 + 4 * 2 * 64) * 40 + 2 * 2 * 64 * 3
    assert f.prefill.subs(T, 10) == (2 * 10 * 2 * 16 + 4 * 2 * 64) * 10 + 2 * 2 * 64  # one short block
    assert kind.dims(c) == "H=2 D=8 C=16 silu gate depth-decay"
    fl = flops(model("lightning(heads = 2, head_dim = 8, chunk = 16)", d_model=16), 40)
    assert fl["prefill"]["ssm"] == int(f.prefill.subs(T, 40))
    assert sympy.Integer(fl["per_token"]["ssm"]) == f.per_token
