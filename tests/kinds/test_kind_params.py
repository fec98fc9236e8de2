"""The layer registry: every parameter is documented, and counts follow the published formulas."""

from pathlib import Path

import pytest

import ltmdsl
from ltmdsl.kinds import REGISTRY

LANGUAGE_DOC = (Path(__file__).resolve().parents[2] / "docs" / "LANGUAGE.md").read_text()


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_parameter_is_documented(kind):
    assert f"**{kind}**" in LANGUAGE_DOC or f"**{kind}** (" in LANGUAGE_DOC
    for param in REGISTRY[kind].params:
        assert f"`{param.name}`" in LANGUAGE_DOC, f"{kind}.{param.name} missing from docs/LANGUAGE.md"


def one(layer: str, d_model: int = 64) -> int:
    spec = ltmdsl.loads(f"model m {{\n vocab = 2\n d_model = {d_model}\n layer x = {layer}\n stack {{ x }}\n}}\n")
    return spec.model.layers[0].params - d_model  # minus the rmsnorm weight


@pytest.mark.parametrize("layer, expected", [
    ("attention(heads = 4, kv_heads = 2)", 64 * 64 + 2 * 64 * 32 + 64 * 64),
    ("attention(heads = 4, qkv_bias = true, out_bias = true)", 4 * 64 * 64 + 3 * 64 + 64),
    ("attention(heads = 2, head_dim = 8, v_head_dim = 4, qk_norm = true)", 64 * 16 + 64 * 16 + 64 * 8 + 8 * 64 + 16),
    ("attention(heads = 4, kv_heads = 2, rope_scaling = llama3(factor = 8, low_freq_factor = 1, "
     "high_freq_factor = 4, original_context = 8192))", 64 * 64 + 2 * 64 * 32 + 64 * 64),
    ("attention(heads = 4, kv_heads = 2, rope_dim = 8)", 64 * 64 + 2 * 64 * 32 + 64 * 64),
    ("mlp(d_ff = 10, act = swiglu)", 3 * 64 * 10),
    ("mlp(d_ff = 10, act = relu2, bias = true)", 2 * 64 * 10 + 10 + 64),
    ("moe(experts = 3, top_k = 1, d_ff = 10)", 64 * 3 + 3 * 3 * 64 * 10),
    ("mamba(d_state = 4, d_conv = 3, expand = 2, dt_rank = 5)",
     64 * 256 + 128 * 3 + 128 + 128 * (5 + 8) + 5 * 128 + 128 + 128 * 4 + 128 + 128 * 64),
    ("mamba2(d_state = 4, head_dim = 16, n_groups = 2, d_conv = 3)",
     64 * (256 + 16 + 8) + (128 + 16) * 4 + 8 * 3 + 128 + 128 * 64),
], ids=["gqa", "biases", "dv-qknorm", "gqa-llama3-rope", "gqa-rope-dim", "swiglu", "relu2-bias", "moe", "mamba1",
        "mamba2"])
def test_parameter_counts(layer, expected):
    assert one(layer) == expected
