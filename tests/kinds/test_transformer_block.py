"""transformer_block, `input = concat_embed`, `into = next_input` and per-use parameters in the language and the
memory model: exact counts (shared weights once, adapters once per use), the per-use KV cache, and every
misuse an error at its argument with a caret."""

from __future__ import annotations

import pytest

import ltmdsl
from ltmdsl.errors import SpecError

D, H, HD, F, R = 32, 4, 16, 48, 4  # d_model, heads, head_dim (2d / heads), d_ff, adapter rank
BASE = """model m {{
    vocab = 64
    d_model = 32
    layer ssm = mamba2(d_state = 8, head_dim = 16, chunk = 16)
    layer sattn = attention(heads = 4, head_dim = 16, scale = 0.35)
    layer smlp = mlp(d_ff = 48, act = geglu)
    {extra}
    shared block z {{ tf }}
    stack {{ {stack} }}
}}
budget b for m {{ inference context = 1Ki, batch = 2 }}
"""
TF = "layer tf = transformer_block(attn = sattn, ffn = smlp, adapter_rank = 4, input = concat_embed, into = next_input)"


def load(extra: str = TF, stack: str = "ssm z ssm ssm z ssm"):
    return ltmdsl.loads(BASE.format(extra=extra, stack=stack), name="z.ltm")


def test_counts_shared_weights_once_and_adapters_per_use():
    """Each use: pre-norm over 2d, attention with 2d input columns, mid norm, GeGLU MLP; per use: q, k, v and
    gate|up adapters of rank 4 and a [d, d] out_proj. Two uses of shared block z own one copy of the rest."""
    ir = load().model
    tf = [x for x in ir.layers if x.kind == "transformer_block"]
    attn = 2 * D * (3 * H * HD) + H * HD * D  # q, k, v read 2d; o writes d
    mlp = 3 * D * F
    shared = 2 * D + attn + D + mlp  # the 2d-wide pre-norm, attention, mid norm, MLP
    per_use = 3 * R * (2 * D + H * HD) + R * (D + 2 * F) + D * D
    assert tf[0].params == shared + per_use and tf[0].use_params == per_use
    ssm = [x for x in ir.layers if x.kind == "mamba2"][0].params
    want = 64 * D * 2 + D + 4 * ssm + shared + 2 * per_use  # embed, untied head, final norm
    assert ir.params_total == want
    assert tf[1].tie_group == "z" and tf[1] not in ir.unique_layers()


def test_memory_counts_per_use_weights_and_one_kv_cache_per_use():
    spec = load()
    m = spec.memory("b")
    assert m.components["weights"] == spec.model.params_total * 2  # bf16
    assert m.components["kv_cache"] == 2 * (2 * 2 * H * HD * 1024 * 2)  # two uses x B=2 x (k, v) x H x D x T x bf16
    assert set(m.to_json()["by_kind"]["kv_cache"]) == {"transformer_block/attention"}


def test_without_adapters_nothing_is_per_use_but_out_proj():
    ir = load(TF.replace("adapter_rank = 4", "adapter_rank = 0")).model
    assert {x.use_params for x in ir.layers if x.kind == "transformer_block"} == {D * D}
    ir = load(TF.replace("adapter_rank = 4", "adapter_rank = 0, out_proj = false")).model
    assert {x.use_params for x in ir.layers if x.kind == "transformer_block"} == {0}


@pytest.mark.parametrize("extra, stack, message, at", [
    ("layer tf = transformer_block(attn = ssm, ffn = smlp)", "ssm z ssm", "attn must name an attention layer",
     "attn ="),
    ("layer tf = transformer_block(attn = sattn, ffn = sattn)", "ssm z ssm", "ffn must name an mlp layer", "ffn ="),
    ("layer tf = transformer_block(attn = sattn, ffn = smlp, attn_adapters = true)", "ssm z ssm",
     "attn_adapters = true needs adapter_rank > 0", "attn_adapters"),
    (TF + "\n    layer wide = mamba2(d_state = 8, head_dim = 16, input = concat_embed)", "wide z ssm",
     "input = concat_embed gives the mixer 2 * d_model channels", "input"),
    (TF.replace("into = next_input", "into = next_input, skip = normed"), "ssm z ssm",
     "into = next_input leaves the residual stream as it is", "skip"),
    (TF, "ssm ssm z", "it is the last one", "tf }"),  # the sub-layer, inside the block that the stack ends with
], ids=["attn-not-attention", "ffn-not-mlp", "adapters-without-rank", "wide-input-elsewhere", "into-with-skip",
        "into-at-the-end"])
def test_errors_point_at_the_argument(extra, stack, message, at):
    """`file:line:col: error:` with the line and a caret, at the offending argument or stack item."""
    with pytest.raises(SpecError) as e:
        load(extra, stack)
    errors = [d for d in e.value.diagnostics if d.severity == "error"]
    assert message in errors[0].message, errors[0].message
    line = errors[0].source_line
    assert errors[0].col == line.index(at) + 1, (line, errors[0].col)
    text = str(e.value)
    assert f"z.ltm:{errors[0].line}:{errors[0].col}: error: {errors[0].message}" in text
    assert "^" in text


def test_show_and_fmt():
    """`show` prints the block's parts and marks the tied use; fmt keeps the settings and parses back."""
    from ltmdsl.commands.show import table
    from ltmdsl.fmt import format_spec
    from ltmdsl.parser import parse

    spec = load()
    out = table(spec.model)
    assert "lora r=4 on qkv+ffn" in out and "(tied: z)" in out
    text = BASE.format(extra=TF, stack="ssm z ssm ssm z ssm")
    again = format_spec(parse(text, "z.ltm"))
    assert "input = concat_embed" in again and "into = next_input" in again
    assert [(x.mixer, x.params, x.residual, x.tie_group) for x in ltmdsl.loads(again).model.layers] == \
        [(x.mixer, x.params, x.residual, x.tie_group) for x in spec.model.layers]
