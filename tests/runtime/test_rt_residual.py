"""Per-sub-layer residual connections (ltmdsl.ir.Residual: `skip`, `skip_scale`, `branch_scale`).

    x' = skip_scale * s + branch_scale * residual_scale * post_norm(f(norm(x))),  s = x or norm(x)

A float64 loop over that formula (no fused add) checks prefill and decode (ORACLE_TOL = 1e-12); transformers'
MiniMaxDecoderLayer, whose residual is taken after the norm and scaled by alpha with the branch scaled by
beta, is checked in float64 in tests/hf/test_hf_minimax.py (it needs the MiniMax weight mapping). Bad values
are spec errors at their line and column.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from test_rt_model_scalars import _norm, model_of

import ltmdsl
from ltmdsl.errors import SpecError
from ltmdsl.ir import Residual

ORACLE_TOL = 1e-12
IDS = torch.tensor([[3, 17, 5, 40, 9, 22, 31, 0, 12, 47, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])

SPEC = """
model residuals {
    vocab = 48
    d_model = 16
    dtype = fp32
    norm = rmsnorm(eps = 1e-6)
    residual_scale = 0.9
    layer f = mlp(d_ff = 24, skip = normed, skip_scale = 3.5, branch_scale = 0.5)
    layer g = mlp(d_ff = 20, act = gelu, skip_scale = 0.7, post_norm = rmsnorm(eps = 1e-6))
    layer p = mlp(d_ff = 12)
    layer n = mlp(d_ff = 12, skip = normed)
    stack { f g p n f }
}
"""


def oracle(m, ids):
    """runtime/model.py's formula written out, sub-layer by sub-layer."""
    ir = m.ir
    h = m.embed.weight[ids]
    for layer, block in zip(ir.layers, m.layers):
        x = _norm(layer.norm, block.norm, h)
        mlp = block.mixer
        up = x @ mlp.up_proj.weight.t()
        act = F.silu(x @ mlp.gate_proj.weight.t()) * up if mlp.gate_proj is not None else F.gelu(up)
        out = act @ mlp.down_proj.weight.t()
        if layer.post_norm is not None:
            out = _norm(layer.post_norm, block.post_norm, out)
        r = layer.residual
        skip = x if r.skip == "normed" else h
        h = r.skip_scale * skip + r.branch_scale * ir.residual_scale * out
    return _norm(ir.final_norm, m.final_norm, h) @ m.lm_head.weight.t()


def test_resolved_residuals():
    layers = ltmdsl.loads(SPEC).model.layers
    assert [x.residual for x in layers] == [Residual("normed", 3.5, 0.5), Residual("input", 0.7, 1.0), Residual(),
                                            Residual("normed"), Residual("normed", 3.5, 0.5)]
    assert layers[2].residual.plain and not layers[3].residual.plain


def test_residuals_match_the_formula_in_prefill_chunks_and_decode():
    m = model_of(SPEC)
    with torch.no_grad():
        ref = oracle(m, IDS)
        assert_close(m(IDS), ref, ORACLE_TOL, "prefill")
        cache = m.new_cache(2, IDS.shape[1])
        parts = [m(IDS[:, :4], cache), m(IDS[:, 4:7], cache)] + [m(IDS[:, i:i + 1], cache) for i in range(7, 11)]
        assert_close(torch.cat(parts, 1), ref, ORACLE_TOL, "chunked prefill + decode")


def test_default_residual_is_the_plain_one():
    plain = SPEC.replace("skip = normed, skip_scale = 3.5, branch_scale = 0.5", "").replace(
        "skip_scale = 0.7, ", "").replace(", skip = normed", "")
    m = model_of(plain)
    assert all(layer.residual.plain for layer in m.ir.layers)
    with torch.no_grad():
        h = m.embed.weight[IDS]
        for layer, block in zip(m.ir.layers, m.layers):
            x = _norm(layer.norm, block.norm, h)
            out = block.mixer(x, None, 0)
            h = h + 0.9 * (_norm(layer.post_norm, block.post_norm, out) if layer.post_norm is not None else out)
        ref = _norm(m.ir.final_norm, m.final_norm, h) @ m.lm_head.weight.t()
        assert_close(m(IDS), ref, ORACLE_TOL, "plain residual")


def test_pipeline_stages_compute_the_residuals_as_the_model():
    """Pipeline stages go through the same Block.advance (they once dropped post norms and scales); the last
    stage ends at the final norm (its loss applies the head, chunked)."""
    from ltmdsl.distributed.pipeline import Stage

    m = model_of(SPEC)
    first, second = Stage(m, range(0, 3), True, False), Stage(m, range(3, 5), False, True)
    with torch.no_grad():
        assert_close(second(first(IDS)), m(IDS, output="hidden"), ORACLE_TOL, "two pipeline stages")


@pytest.mark.parametrize("setting, message", [
    ("skip = after", "skip of layer 'f' must be one of input, normed; got 'after'"),
    ("skip_scale = -1", "skip_scale of layer 'f' must be positive, got -1"),
    ("branch_scale = true", "branch_scale of layer 'f' must be a number, got a boolean"),
], ids=["skip", "skip_scale", "branch_scale"])
def test_bad_residual_settings_are_errors_at_their_value(setting, message):
    text = f"model m {{\n    vocab = 8\n    d_model = 8\n    layer f = mlp(d_ff = 8, {setting})\n" \
           "    stack { f }\n}\n"
    with pytest.raises(SpecError) as e:
        ltmdsl.loads(text, name="r.ltm")
    out = str(e.value)
    col = text.splitlines()[3].index(setting.split(" = ")[1]) + 1
    assert f"r.ltm:4:{col}: error: {message}" in out, out


def test_a_shared_block_slot_must_keep_its_residual():
    text = """model m {
    vocab = 8
    d_model = 8
    layer f = mlp(d_ff = 8)
    shared block z { f }
    stack { z z(skip_scale = 2) }
}
"""
    with pytest.raises(SpecError):
        ltmdsl.loads(text)
