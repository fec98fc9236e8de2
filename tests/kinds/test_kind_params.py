"""The layer registry: every parameter is documented, and counts follow the published formulas."""

import re
from pathlib import Path

import pytest

import ltmdsl
from ltmdsl.kinds import REGISTRY

LANGUAGE_DOC = (Path(__file__).resolve().parents[2] / "docs" / "LANGUAGE.md").read_text()


def kind_section(doc: str, kind: str) -> str | None:
    """The text docs/LANGUAGE.md gives one layer kind: from the paragraph that opens with `**kind**` up to the
    next paragraph opening with another `**kind**`, or the next heading; None when there is no such paragraph."""
    start = re.search(rf"^\*\*{re.escape(kind)}\*\*", doc, re.MULTILINE)
    if start is None:
        return None
    end = re.search(r"^(\*\*[a-z0-9_]+\*\*|#)", doc[start.end():], re.MULTILINE)
    return doc[start.start():start.end() + (end.start() if end else len(doc))]


def undocumented(doc: str, kind: str, names) -> list[str]:
    """The parameters of `kind` that its own section of `doc` does not name as `name` (all of them when the
    kind has no section): a parameter documented only under another kind does not count."""
    section = kind_section(doc, kind)
    if section is None:
        return list(names)
    return [n for n in names if not re.search(rf"`{re.escape(n)}`", section)]


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_parameter_is_documented(kind):
    missing = undocumented(LANGUAGE_DOC, kind, [p.name for p in REGISTRY[kind].params])
    assert not missing, f"{kind}: {', '.join(missing)} not documented in its section of docs/LANGUAGE.md"


@pytest.mark.parametrize("kind, name", [(k, p.name) for k in sorted(REGISTRY) for p in REGISTRY[k].params],
                         ids=lambda v: str(v))
def test_documentation_check_catches_a_missing_parameter(kind, name):
    """The check above is real: deleting one parameter's mention from its kind's section makes it fail, even
    when another kind documents a parameter of the same name (mamba2's `heads`, `d_state`, ...)."""
    section = kind_section(LANGUAGE_DOC, kind)
    doc = LANGUAGE_DOC.replace(section, re.sub(rf"`{re.escape(name)}`", "(removed)", section))
    assert name in undocumented(doc, kind, [p.name for p in REGISTRY[kind].params])
    assert undocumented(LANGUAGE_DOC.replace(section, ""), kind, [name]) == [name]


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
