"""The parallel frame in the language and the memory model: branches named by definition, errors at the
argument with a caret, and every count the two branches' (parameters, caches, FLOPs, workspace, activations)."""

from __future__ import annotations

import pytest
import sympy

import ltmdsl
from ltmdsl.errors import SpecError
from ltmdsl.kinds import REGISTRY
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T

BASE = """model m {{
    vocab = 64
    d_model = 32
    layer attn = attention(heads = 4, kv_heads = 2)
    layer ssm = mamba2(d_state = 8, head_dim = 16, chunk = 16)
    {extra}
    layer ffn = mlp(d_ff = 48)
    stack {{ {stack} }}
}}
budget b for m {{ inference context = 1Ki, batch = 2 }}
budget t for m {{ training context = 256, batch = 2 }}
"""


def load(extra: str, stack: str = "mix ffn"):
    return ltmdsl.loads(BASE.format(extra=extra, stack=stack), name="p.ltm")


def test_counts_and_caches_are_the_branches():
    both = load("layer mix = parallel(a = attn, b = ssm, a_in = 0.5, b_out = 0.3)")
    alone = load("", stack="attn ffn ssm ffn")
    mix = both.model.layers[0]
    attn, ssm = alone.model.layers[0], alone.model.layers[2]
    assert mix.params == attn.params + ssm.params - 32  # one pre-norm, not two
    assert both.warnings == []  # the branch definitions are used
    for budget in ("b",):
        p, q = both.memory(budget).components, alone.memory(budget).components
        assert p["kv_cache"] == q["kv_cache"] and p["recurrent_state"] == q["recurrent_state"]
    by_kind = both.memory("b").to_json()["by_kind"]
    assert set(by_kind["kv_cache"]) == {"parallel/attention"}
    assert set(by_kind["recurrent_state"]) == {"parallel/mamba2/conv", "parallel/mamba2/ssm"}


def test_workspace_stored_and_flops_formulas():
    """Workspace: max of the branches + the held output a*n*d; stored: both, the norm once, + a*sbh per scaled
    input; FLOPs: the branches' summed by component."""
    from ltmdsl.memory.activations import MicroBatch
    from ltmdsl.memory.settings import resolve

    spec = load("layer mix = parallel(a = attn, b = ssm, a_in = 0.5, b_out = 0.3)")
    ir = spec.model
    mix = ir.layers[0].mixer
    kind, a, b = REGISTRY["parallel"], REGISTRY["attention"], REGISTRY["mamba2"]
    s = resolve(ir, spec.budget("b"))
    ws = kind.workspace(mix, 32, s)
    held = s.activation_dtype.bytes * B * Smallest(C, T) * 32  # the first branch's output [b, Cc, d]
    want = Largest(a.workspace(mix.a, 32, s), b.workspace(mix.b, 32, s)) + held
    assert sympy.simplify(ws - want) == 0
    x = MicroBatch(ir, resolve(ir, spec.budget("t")), ir.layers[0].norm)
    stored = kind.stored(mix, x, False)
    assert sympy.simplify(stored - (a.stored(mix.a, x, False) + b.stored(mix.b, x, False) - x.base
                                    + x.rep(x.a * x.tok * x.h))) == 0
    flops = kind.flops(mix)
    assert set(flops) == set(a.flops(mix.a)) | set(b.flops(mix.b))


@pytest.mark.parametrize("extra, message, at", [
    ("layer mix = parallel(a = attn, b = nope)", "b of layer 'mix': unknown layer 'nope'", "nope"),
    ("layer mix = parallel(a = attn, b = 3)", "b of layer 'mix' must name a layer definition", "3"),
    ("layer mix = parallel(a = attn, b = mix)", "'mix' is a parallel layer (or itself)", "mix)"),
    ("layer n = mamba2(d_state = 8, head_dim = 16, norm = layernorm(eps = 1e-5))\n"
     "    layer mix = parallel(a = attn, b = n)", "'n' sets its own norm", "n)"),
    ("layer mix = parallel(a = attn)", "parallel layer 'mix' is missing required parameter b", "parallel"),
    ("layer mix = parallel(a = attn, b = ssm, a_out = 0)", "a_out of layer 'mix' must be positive", "0)"),
    ("layer mix = parallel(a = attn, b = ssm, c = ssm)", "unknown parameter 'c' of parallel", "c ="),
], ids=["unknown", "number", "itself", "own-norm", "missing", "zero-scale", "third-branch"])
def test_errors_point_at_the_argument(extra, message, at):
    """`file:line:col: error:` at the offending argument (the column of `at` on the parallel line)."""
    with pytest.raises(SpecError) as e:
        load(extra)
    errors = [d for d in e.value.diagnostics if d.severity == "error"]
    assert message in errors[0].message, errors[0].message
    line = errors[0].source_line
    assert "parallel(" in line and errors[0].col == line.index(at) + 1
    assert f"p.ltm:{errors[0].line}:{errors[0].col}: error: {errors[0].message}" in str(e.value)


def test_nested_parallel_is_refused():
    with pytest.raises(SpecError, match="'mix' is a parallel layer"):
        load("layer mix = parallel(a = attn, b = ssm)\n    layer two = parallel(a = mix, b = ssm)", stack="two ffn")


def test_fmt_round_trips():
    from ltmdsl.fmt import format_spec
    from ltmdsl.parser import parse

    text = BASE.format(extra="layer mix = parallel(a = attn, b = ssm, a_in = 0.5)", stack="mix ffn")
    out = format_spec(parse(text, "p.ltm"))
    assert "layer mix = parallel(a = attn, b = ssm, a_in = 0.5)" in out
    assert [(x.mixer, x.params) for x in ltmdsl.loads(out).model.layers] == \
        [(x.mixer, x.params) for x in ltmdsl.loads(text).model.layers]


def test_falcon_h1_imports_as_parallel_layers():
    """A Falcon-H1 config is one parallel sub-layer (attention beside Mamba-2) then an MLP per HF layer."""
    from ltmdsl.hf.configs import spec_from_config

    ir = ltmdsl.loads(spec_from_config({"model_type": "falcon_h1", "num_hidden_layers": 2})).model
    assert [x.kind for x in ir.layers] == ["parallel", "mlp"] * 2
    assert (ir.layers[0].mixer.a.kind, ir.layers[0].mixer.b.kind) == ("attention", "mamba2")
