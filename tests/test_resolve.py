"""Resolution of the language's composition features into the flat IR stack, and of budgets."""

import pytest

import ltmdsl
from ltmdsl import SpecError
from ltmdsl.kinds.attention import AttentionConfig

HEAD = """
model m {
    vocab = 256
    d_model = 64
    layer attn = attention(heads = 4, kv_heads = 2)
    layer swa = attention(heads = 4, window = 16)
    layer ssm = mamba2(d_state = 16, head_dim = 16)
    layer ffn = mlp(d_ff = 128)
"""


def load(body: str, extra: str = ""):
    return ltmdsl.loads(HEAD + body + "\n}\n" + extra)


def kinds(spec):
    return [layer.definition for layer in spec.model.layers]


def test_repeat_and_sequence():
    spec = load("stack { repeat 2 { ssm ffn } attn ffn }")
    assert kinds(spec) == ["ssm", "ffn", "ssm", "ffn", "attn", "ffn"]
    assert [layer.index for layer in spec.model.layers] == list(range(6))


def test_nested_repeat_and_blocks():
    spec = load("block pair { ssm ffn }\n stack { repeat 2 { repeat 2 { pair } swa ffn } }")
    assert kinds(spec) == (["ssm", "ffn"] * 2 + ["swa", "ffn"]) * 2


def test_pattern_with_legend_ignores_spaces():
    spec = load('legend { M = ssm, "*" = attn, "-" = ffn }\n stack { pattern "M- M- *-" }')
    assert kinds(spec) == ["ssm", "ffn", "ssm", "ffn", "attn", "ffn"]


def test_inline_and_indexed_overrides():
    spec = load("stack { swa(window = 8) ffn swa ffn }\n override 2 (window = 4)")
    windows = [layer.mixer.window for layer in spec.model.layers if isinstance(layer.mixer, AttentionConfig)]
    assert windows == [8, 4]


def test_shared_block_counts_weights_once():
    plain = load("stack { attn ffn attn ffn }").model
    shared = load("shared block z { attn ffn }\n stack { z z }").model
    assert [layer.tie_group for layer in shared.layers] == ["z"] * 4
    assert [layer.tie_slot for layer in shared.layers] == [0, 1, 0, 1]
    per_pair = plain.layers[0].params + plain.layers[1].params
    assert plain.params_total - shared.params_total == per_pair


def test_repeat_inside_shared_block_gets_own_slots():
    m = load("shared block z { repeat 2 { ffn } }\n stack { z z }").model
    assert [layer.tie_slot for layer in m.layers] == [0, 1, 0, 1]


def test_constants_and_expressions():
    spec = ltmdsl.loads("""
const width = 32 * 2
model m {
    vocab = 2 ** 8
    d_model = width
    heads = 4
    layer attn = attention(heads = heads, head_dim = d_model / heads / 2)
    stack { attn }
}
""")
    assert spec.model.d_model == 64 and spec.model.layers[0].mixer.head_dim == 8


def test_use_imports_definitions(tmp_path):
    (tmp_path / "common.ltm").write_text("const width = 64\nlayer ffn = mlp(d_ff = 2 * d_model)\n")
    main = tmp_path / "main.ltm"
    main.write_text('use "common.ltm"\nmodel m {\n vocab = 256\n d_model = width\n stack { ffn ffn }\n}\n')
    spec = ltmdsl.load(main)
    assert [layer.mixer.d_ff for layer in spec.model.layers] == [128, 128]


def test_duplicate_across_import_is_an_error(tmp_path):
    (tmp_path / "a.ltm").write_text("const width = 64\n")
    main = tmp_path / "main.ltm"
    main.write_text('use "a.ltm"\nconst width = 32\nmodel m { vocab = 2 d_model = width layer f = mlp(d_ff = 2) stack { f } }\n')
    with pytest.raises(SpecError, match="duplicate definition 'width'"):
        ltmdsl.load(main)


def test_norm_and_head_settings():
    spec = ltmdsl.loads("""
model m {
    vocab = 256
    d_model = 64
    norm = layernorm(eps = 1e-6)
    head = tied
    layer ffn = mlp(d_ff = 128, act = gelu, bias = true)
    layer attn = attention(heads = 4, norm = rmsnorm(eps = 1e-5))
    stack { attn ffn }
}
""")
    m = spec.model
    assert m.tie_embeddings and m.head_params == 0
    assert m.final_norm.kind == "layernorm" and m.final_norm.eps == 1e-6
    assert m.layers[0].norm.kind == "rmsnorm" and m.layers[1].norm.kind == "layernorm"
    # gelu MLP with bias: 2*d*F + F + d, plus a layernorm weight and bias
    assert m.layers[1].params == 2 * 64 * 128 + 128 + 64 + 2 * 64


BUDGET_MODEL = HEAD + "    stack { attn ffn ssm ffn }\n}\n"


def test_budget_defaults_and_plan():
    model = BUDGET_MODEL.replace("head_dim = 16)", "head_dim = 16, n_groups = 2)")  # tp must divide the groups
    spec = ltmdsl.loads(model + """
gpu big { memory = 96 GB, bf16_tflops = 1000, bandwidth = 4 TB }
budget train for m {
    training context = 1Mi, batch = 8, recompute = selective
    on 64 x big with tp = 2, cp = 4, zero = 1
    require per_gpu <= 80 GB
    require activations < 10 GiB
}
""")
    b = spec.budget("train")
    assert b.mode == "training" and b.context == 2**20 and b.batch == 8
    assert b.gpu.name == "big" and b.gpu.memory_bytes == 96 * 10**9
    assert (b.parallel.tp, b.parallel.cp, b.parallel.dp, b.parallel.zero) == (2, 4, 8, 1)
    assert b.optimizer == "adamw" and b.recompute == "selective"
    assert b.kv_dtype.name == "bf16"
    assert [(lim.component, lim.bound) for lim in b.limits] == [("per_gpu", 80 * 10**9), ("activations", 10 * 2**30 - 1)]


def test_budget_needs_mode_line():
    with pytest.raises(SpecError, match="needs a mode line"):
        ltmdsl.loads(BUDGET_MODEL + "budget b for m { on 1 x H100 }\n")


def test_explicit_dp_must_match_gpu_count():
    with pytest.raises(SpecError, match="must equal the GPU count"):
        ltmdsl.loads(BUDGET_MODEL + "budget b for m { inference context = 1K\n on 8 x H100 with tp = 2, dp = 2 }\n")


def test_errors_are_all_reported_at_once():
    with pytest.raises(SpecError) as info:
        load("stack { atn fn }")
    assert len(info.value.errors) == 2


def test_source_text_of_an_importing_spec_loads_alone(tmp_path):
    (tmp_path / "common.ltm").write_text("const width = 64\nlayer ffn = mlp(d_ff = 2 * d_model)\n")
    main = tmp_path / "main.ltm"
    main.write_text('use "common.ltm"\nmodel m {\n vocab = 256\n d_model = width\n stack { ffn ffn }\n}\n')
    spec = ltmdsl.load(main)
    again = ltmdsl.loads(spec.model.source_text)
    assert again.model.params_total == spec.model.params_total


# ---- rope_scaling = llama3(...) ---------------------------------------------------------------

LLAMA3 = "llama3(factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_context = 8Ki)"


def test_llama3_rope_scaling_resolves():
    """Values become floats (original_context an int); the default is none; counts do not change; a constant
    can hold the call; overrides can set and clear it per position."""
    from ltmdsl.ir import RopeScaling

    spec = ltmdsl.loads(f"""model m {{
    vocab = 256
    d_model = 64
    s = {LLAMA3}
    layer attn = attention(heads = 4, rope_theta = 5e5, rope_scaling = s)
    layer plain = attention(heads = 4, rope_theta = 5e5)
    stack {{ attn plain attn(rope_scaling = none) }}
    override 1 (rope_scaling = llama3(factor = 2, low_freq_factor = 0.5, high_freq_factor = 1.5,
                                      original_context = 4096))
}}""")
    a, b, c = (layer.mixer for layer in spec.model.layers)
    assert a.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert isinstance(a.rope_scaling.factor, float) and isinstance(a.rope_scaling.original_context, int)
    assert b.rope_scaling == RopeScaling("llama3", 2.0, 0.5, 1.5, 4096) and c.rope_scaling is None
    assert len({layer.params for layer in spec.model.layers}) == 1
    assert spec.model.to_json()["layers"][0]["mixer"]["rope_scaling"] == {
        "kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context": 8192}
    assert load("stack { attn }").model.layers[0].mixer.rope_scaling is None


@pytest.mark.parametrize("value, message", [
    ("llama3(factor = 8, low_freq_factor = 1, high_freq_factor = 4, orig_context = 8192)",
     r"unknown parameter 'orig_context' of llama3\(\); did you mean 'original_context'\?"),
    ("llama3(factor = 8, low_freq_factor = 1, high_freq_factor = 4)",
     r"llama3\(\) is missing original_context \(it needs all four"),
    ("llama3(8, 1, 4, 8192)", r"llama3\(\) takes keyword arguments only"),
    ("llama3(factor = 8, factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_context = 8192)",
     r"parameter 'factor' of llama3\(\) given twice"),
    ("llama3(factor = 0.5, low_freq_factor = 1, high_freq_factor = 4, original_context = 8192)",
     r"llama3\(\) factor must be at least 1, got 0.5"),
    ("llama3(factor = 8, low_freq_factor = 0, high_freq_factor = 4, original_context = 8192)",
     r"llama3\(\) low_freq_factor must be positive, got 0"),
    ("llama3(factor = 8, low_freq_factor = 4, high_freq_factor = 2, original_context = 8192)",
     r"llama3\(\) high_freq_factor \(2\) must be at least low_freq_factor \(4\)"),
    ("llama3(factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_context = 8192.5)",
     r"llama3\(\) original_context must be an integer, got the number 8192.5"),
    ("llama3(factor = 8, low_freq_factor = 1, high_freq_factor = 4, original_context = 0)",
     r"llama3\(\) original_context must be at least 1, got 0"),
    ("llama3(factor = true, low_freq_factor = 1, high_freq_factor = 4, original_context = 8192)",
     r"llama3\(\) factor must be a number, got a boolean"),
    ("llama3(factor = eigth, low_freq_factor = 1, high_freq_factor = 4, original_context = 8192)",
     "unknown name 'eigth'; did you mean 'eight'?"),
    ("llama3", r"llama3 needs its parameters: llama3\(factor = \.\.\."),
    ("llama(factor = 8)", "unknown function 'llama'; did you mean 'llama3'?"),
    ("rmsnorm(eps = 1e-5)", r"rope_scaling of layer 'attn' must be llama3\(.*\) or none, got a rmsnorm"),
    ("8", r"rope_scaling of layer 'attn' must be llama3\(.*\) or none, got the integer 8"),
])
def test_llama3_rope_scaling_errors(value, message):
    with pytest.raises(SpecError, match=message):
        ltmdsl.loads(f"model m {{\n vocab = 2\n d_model = 64\n eight = 8\n"
                    f" layer attn = attention(heads = 4, rope_scaling = {value})\n stack {{ attn }}\n"
                    f" override 0 (window = eight)\n}}\n")


def test_rope_scaling_needs_rope():
    with pytest.raises(SpecError, match="rope_scaling rescales RoPE frequencies, but rope_theta = none"):
        load(f"layer nope = attention(heads = 4, rope_theta = none, rope_scaling = {LLAMA3})\n stack {{ nope }}")


# ---- rope_dim (partial rotary embeddings) ------------------------------------------------------


def test_rope_dim_resolves():
    """An int per sub-layer (expressions allowed), none by default; rope_dim = head_dim is the whole head and
    resolves to none, so it equals the plain definition; overrides set and clear it; it goes with rope_scaling;
    parameter counts do not change."""
    spec = ltmdsl.loads(f"""model m {{
    vocab = 256
    d_model = 64
    layer part = attention(heads = 4, rope_dim = 16 // 2)
    layer whole = attention(heads = 4, rope_dim = 16)
    layer plain = attention(heads = 4)
    layer scaled = attention(heads = 4, rope_theta = 5e5, rope_scaling = {LLAMA3}, rope_dim = 4)
    stack {{ part whole plain plain(rope_dim = 2) part(rope_dim = none) scaled }}
    override 2 (rope_dim = 12)
}}""")
    dims = [layer.mixer.rope_dim for layer in spec.model.layers]
    assert dims == [8, None, 12, 2, None, 4]
    assert spec.model.layers[1].mixer == spec.model.layers[4].mixer  # whole head either way
    assert [layer.mixer.rotary_dim for layer in spec.model.layers] == [8, 16, 12, 2, 16, 4]
    assert spec.model.layers[5].mixer.rope_scaling is not None
    assert len({layer.params for layer in spec.model.layers}) == 1
    assert spec.model.to_json()["layers"][0]["mixer"]["rope_dim"] == 8
    assert load("stack { attn }").model.layers[0].mixer.rope_dim is None


@pytest.mark.parametrize("layer, message", [
    ("attention(heads = 4, rope_dim = 7)",
     r"layer 'x': rope_dim must be even \(RoPE rotates channels in pairs\), got 7"),
    ("attention(heads = 4, rope_dim = 18)", r"layer 'x': rope_dim \(18\) cannot exceed head_dim \(16\)"),
    ("attention(heads = 4, head_dim = 4, rope_dim = 6)", r"rope_dim \(6\) cannot exceed head_dim \(4\)"),
    ("attention(heads = 4, rope_dim = 0)", "rope_dim of layer 'x' must be at least 2, got 0"),
    ("attention(heads = 4, rope_dim = -2)", "rope_dim of layer 'x' must be at least 2, got -2"),
    ("attention(heads = 4, rope_dim = 8.5)", "rope_dim of layer 'x' must be an integer"),
    ("attention(heads = 4, rope_dim = true)", "rope_dim of layer 'x' must be an integer"),
    ("attention(heads = 4, rope_dim = eigth)", "unknown name 'eigth'; did you mean 'eight'?"),
    ("attention(heads = 4, rope_theta = none, rope_dim = 8)",
     "layer 'x': rope_dim chooses how many channels RoPE rotates, but rope_theta = none turns RoPE off"),
    ("attention(heads = 4, rope_theta = none, rope_dim = 16)", "rope_theta = none turns RoPE off"),
])
def test_rope_dim_errors_point_at_the_parameter(layer, message):
    """Range and type errors point at the value, the checks that need head_dim or rope_theta at `rope_dim`."""
    text = f"model m {{\n vocab = 2\n d_model = 64\n eight = 8\n layer x = {layer}\n stack {{ x }}\n}}\n"
    with pytest.raises(SpecError, match=message) as e:
        ltmdsl.loads(text)
    (error,) = e.value.errors
    line = text.splitlines()[4]
    at_name, at_value = line.index("rope_dim") + 1, line.index("rope_dim = ") + len("rope_dim = ") + 1
    assert (error.line, error.col) in ((5, at_name), (5, at_value)), error.render()


def test_rope_dim_error_through_an_override_points_at_the_definition():
    """Turning RoPE off at one position of a layer that rotates part of the head is an error there too."""
    with pytest.raises(SpecError, match="rope_dim chooses how many channels RoPE rotates"):
        load("layer part = attention(heads = 4, rope_dim = 8)\n stack { part part(rope_theta = none) }")
