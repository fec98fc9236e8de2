"""HF -> ltmdsl -> HF: identical tensors and a config transformers loads to the same logits; the two
commands (`import-hf`, `export-hf`) with their atomic writes and exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import ltmdsl  # noqa: E402
from helpers import assert_close  # noqa: E402
from paths import EXAMPLES  # noqa: E402
from hf_tiny import CASES, LLAMA3_ROPE, load_hf, save_case  # noqa: E402

from ltmdsl.cli import main  # noqa: E402
from ltmdsl.hf import HFError  # noqa: E402
from ltmdsl.hf.configs import spec_from_config  # noqa: E402
from ltmdsl.hf.export import config_from_ir, export_hf  # noqa: E402


def _tensors(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(case, tmp_path):
    hf = save_case(case, tmp_path / "src")
    model = ltmdsl.from_hf(tmp_path / "src")
    out = export_hf(model, tmp_path / "out", fused=CASES[case][2])
    before, after = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        if CASES[case][0] == "qwen3_next" and name.endswith(("q_norm.weight", "k_norm.weight")):
            # zero-centred: imported as 1 + w, exported as (1 + w) - 1, so the scale transformers applies,
            # 1 + w, is bit-identical though w itself may differ in its last bit
            assert torch.equal(1 + tensor, 1 + after[name]), name
            continue
        assert torch.equal(tensor, after[name]), name
    again = load_hf(out)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(again(ids).logits, hf(ids).logits, 1e-5, f"{case} exported logits")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temporary left behind


def test_llama3_rope_scaling_round_trip(tmp_path):
    """HF (rope_parameters, transformers 5) -> ltmdsl -> HF (rope_scaling, transformers 4 form): transformers
    reads back the same rope parameters and gives the same logits over 40 tokens; a spec with the scaling
    exports to a folder whose logits equal the spec's own model."""
    from transformers import AutoConfig

    hf = save_case("llama3_rope", tmp_path / "src")
    out = export_hf(ltmdsl.from_hf(tmp_path / "src"), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_scaling"] == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert cfg["rope_theta"] == LLAMA3_ROPE["rope_theta"]
    assert AutoConfig.from_pretrained(out).rope_parameters == LLAMA3_ROPE
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(load_hf(out)(ids).logits, hf(ids).logits, 1e-5, "llama3 exported logits")
    spec = tmp_path / "l3.ltm"
    assert main(["import-hf", str(tmp_path / "src"), "-o", str(spec)]) == 0
    assert "rope_scaling = llama3(" in spec.read_text()
    assert main(["export-hf", str(spec), str(tmp_path / "fromspec"), "--seed", "2"]) == 0
    built = ltmdsl.build(ltmdsl.load(spec), seed=2)
    with torch.no_grad():
        assert_close(load_hf(tmp_path / "fromspec")(ids).logits, built(ids), 1e-4, "llama3 spec export")


def test_llama31_example_config_is_the_published_one():
    """The Llama 3.1 8B example's exported config carries the published rope scaling, and transformers reads it
    to the same rope parameters as the published config.json (no weights needed: config only)."""
    from transformers import AutoConfig

    from ltmdsl.hf.export import hf_plan

    published = json.loads((Path(__file__).parent / "configs" / "Llama-3.1-8B.json").read_text())
    cfg, _ = hf_plan(ltmdsl.load(EXAMPLES / "llama-3.1-8b.ltm").model)
    assert cfg["rope_scaling"] == published["rope_scaling"] and cfg["rope_theta"] == published["rope_theta"]
    ours, theirs = AutoConfig.for_model(**cfg), AutoConfig.for_model(**published)
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.max_position_embeddings > published["rope_scaling"]["original_max_position_embeddings"]


def test_bamba_example_config_is_the_published_one():
    """The Bamba 9B example's exported config is, as transformers reads it, the published one: the same layer
    types, RoPE parameters (partial_rotary_factor 0.5), Mamba-2 settings and parameter count (config only)."""
    from transformers import AutoConfig

    from ltmdsl.hf.export import hf_plan

    published = json.loads((Path(__file__).parent / "configs" / "Bamba-9B.json").read_text())
    cfg, _ = hf_plan(ltmdsl.load(EXAMPLES / "bamba-9b.ltm").model)
    assert cfg["attn_layer_indices"] == published["attn_layer_indices"]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    ours, theirs = AutoConfig.for_model(**cfg), AutoConfig.for_model(**published)
    assert ours.rope_parameters == theirs.rope_parameters
    for key in ("layers_block_type", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_expand", "mamba_d_conv",
                "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "rms_norm_eps", "tie_word_embeddings",
                "vocab_size", "hidden_size", "attention_bias", "mlp_bias"):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_rope_dim_exports_only_to_bamba(tmp_path):
    """Partial RoPE exists in transformers' Bamba only (its Llama-style families rotate the whole head): an
    attention + SwiGLU stack with rope_dim becomes a Bamba with attention at every layer, one with an MLP Bamba
    lacks is refused; a Mamba-2 hybrid exports as Bamba, and transformers gives the spec's own logits."""
    llama = """model m {
    vocab = 40
    d_model = 32
    dtype = fp32
    layer attn = attention(heads = 2, rope_dim = 8)
    layer ffn = mlp(d_ff = 24)
    stack { attn ffn attn ffn }
}
"""
    cfg = config_from_ir(ltmdsl.loads(llama).model)
    assert cfg["model_type"] == "bamba" and cfg["attn_layer_indices"] == [0, 1] and "mamba_n_heads" not in cfg
    with pytest.raises(HFError, match="rope_dim .* maps back only to Bamba"):
        config_from_ir(ltmdsl.loads(llama.replace("d_ff = 24", "d_ff = 24, act = gelu")).model)
    spec = tmp_path / "hybrid.ltm"
    spec.write_text(llama.replace("stack { attn ffn attn ffn }", "layer ssm = mamba2(d_state = 8, head_dim = 16, "
                                  "chunk = 4)\n    stack { ssm ffn attn ffn ssm ffn attn(rope_dim = none) ffn }")
                    .replace("heads = 2, rope_dim", "heads = 2, head_dim = 20, rope_dim"))
    with pytest.raises(HFError, match="the layers differ in attention settings"):
        export_hf(spec, tmp_path / "mixed")  # one Bamba config has one rope_dim
    spec.write_text(spec.read_text().replace("attn(rope_dim = none)", "attn"))
    assert main(["export-hf", str(spec), str(tmp_path / "out"), "--seed", "3"]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "bamba" and cfg["attn_layer_indices"] == [1, 3] and cfg["head_dim"] == 20
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.4
    built = ltmdsl.build(ltmdsl.load(spec), seed=3)
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close(load_hf(tmp_path / "out")(ids).logits, built(ids), 1e-4, "bamba spec export")


def test_export_from_spec_and_runtime_checkpoint(tmp_path):
    from ltmdsl.runtime import checkpoint

    save_case("jamba", tmp_path / "src")
    assert main(["import-hf", str(tmp_path / "src"), "-o", str(tmp_path / "j.ltm"), "--name", "tiny"]) == 0
    assert main(["export-hf", str(tmp_path / "j.ltm"), str(tmp_path / "fromspec"), "--seed", "5"]) == 0
    built = ltmdsl.build(ltmdsl.load(tmp_path / "j.ltm"), seed=5)
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert_close(load_hf(tmp_path / "fromspec")(ids).logits, built(ids), 1e-4, "spec export")
    model = ltmdsl.from_hf(tmp_path / "src")
    checkpoint.save(model, tmp_path / "m.safetensors")
    assert main(["export-hf", str(tmp_path / "m.safetensors"), str(tmp_path / "fromckpt"), "--fused-experts"]) == 0
    with torch.no_grad():
        assert_close(load_hf(tmp_path / "fromckpt")(ids).logits, model(ids), 1e-4, "checkpoint export")


def test_models_without_a_counterpart_are_refused(tmp_path, capsys):
    spec = tmp_path / "odd.ltm"
    spec.write_text("""model odd {
    vocab = 40
    d_model = 16
    norm = layernorm(eps = 1e-5)
    layer attn = attention(heads = 2)
    layer ffn = mlp(d_ff = 24, act = gelu)
    stack { attn ffn }
}
""")
    assert main(["export-hf", str(spec), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "error: layernorm has no Hugging Face counterpart" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["odd.ltm"]
    with pytest.raises(HFError, match="activation gelu"):
        config_from_ir(ltmdsl.loads(spec.read_text().replace("layernorm", "rmsnorm")).model)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_export_refuses_to_clobber(tmp_path, capsys):
    save_case("llama", tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["import-hf", str(tmp_path / "src"), "-o", str(tmp_path / "l.ltm")]) == 0
    assert main(["export-hf", str(tmp_path / "l.ltm"), str(tmp_path / "out")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # --force replaces only an earlier ltmdsl output, never a folder holding the user's files
    assert main(["export-hf", str(tmp_path / "l.ltm"), str(tmp_path / "out"), "--force"]) == 2
    assert "not an earlier ltmdsl output" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    os.remove(tmp_path / "out" / "keep.txt")
    assert main(["export-hf", str(tmp_path / "l.ltm"), str(tmp_path / "out")]) == 0  # an empty folder is fine
    assert main(["export-hf", str(tmp_path / "l.ltm"), str(tmp_path / "out"), "--seed", "1", "--force"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == [".ltmdsl-output.json", "config.json", "model.safetensors"]
    modes = {os.stat(tmp_path / "out" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "out")}
    assert modes == {0o666 & ~umask()}  # the mode a plain open() gives, for every file


def test_import_command(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "mamba", "hidden_size": 24, "num_hidden_layers": 5, "vocab_size": 50}))
    out = tmp_path / "m.ltm"
    assert main(["import-hf", str(cfg), "-o", str(out)]) == 0
    assert ltmdsl.load(out).model.params_total > 0
    assert main(["show", str(out)]) == 0
    # bad input: exit 1, a one-line message, nothing written, the previous output untouched
    before = out.read_text()
    cfg.write_text(json.dumps({"model_type": "mamba", "hidden_act": "gelu"}))
    capsys.readouterr()
    assert main(["import-hf", str(cfg), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{cfg}: error: mamba: 'hidden_act'") and "Traceback" not in err
    assert out.read_text() == before
    cfg.write_text("{not json")
    assert main(["import-hf", str(cfg), "-o", str(tmp_path / "n.ltm")]) == 1
    assert "not a JSON config" in capsys.readouterr().err and not (tmp_path / "n.ltm").exists()
    assert main(["import-hf", str(tmp_path / "absent"), "-o", str(tmp_path / "n.ltm")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["import-hf", str(tmp_path / "empty"), "-o", str(tmp_path / "n.ltm")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "empty", "m.ltm"]


# ---- export-hf from hostile or odd checkpoints: clear errors, warnings, no traceback --------------------

def _llama_checkpoint(tmp_path, nan=False):
    from ltmdsl.runtime.checkpoint import save

    save_case("llama", tmp_path / "src")
    assert main(["import-hf", str(tmp_path / "src"), "-o", str(tmp_path / "l.ltm")]) == 0
    model = ltmdsl.build(tmp_path / "l.ltm", seed=1)
    if nan:
        with torch.no_grad():
            model.embed.weight[1, 2] = float("nan")
    return save(model, tmp_path / "l.safetensors")


def _rewrite_metadata(path, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("changes, message", [
    ({"ltmdsl.dtype": ""}, "ltmdsl.dtype is ''"),
    ({"ltmdsl.dtype": "float99"}, "ltmdsl.dtype is 'float99'"),
    ({"ltmdsl.dtype": "int64"}, "ltmdsl.dtype is 'int64'"),
    ({"ltmdsl.model": "other"}, "ltmdsl.model is 'other'"),
    ({"ltmdsl.spec": "/etc/passwd"}, "error"),
], ids=["empty-dtype", "unknown-dtype", "int-dtype", "unknown-model", "path-as-spec"])
def test_export_of_a_bad_checkpoint_is_a_clear_error(tmp_path, capsys, changes, message):
    path = _llama_checkpoint(tmp_path)
    _rewrite_metadata(path, **changes)
    capsys.readouterr()
    assert main(["export-hf", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "root:" not in err
    assert not (tmp_path / "out").exists()


def test_export_warns_about_nan_weights(tmp_path, capsys):
    path = _llama_checkpoint(tmp_path, nan=True)
    capsys.readouterr()
    assert main(["export-hf", str(path), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "NaN or inf in 1 tensor: embed.weight" in warnings[0]


def test_export_to_an_unwritable_place_is_a_clear_error(tmp_path, capsys):
    save_case("llama", tmp_path / "src")
    assert main(["import-hf", str(tmp_path / "src"), "-o", str(tmp_path / "l.ltm")]) == 0
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "l.ltm"), "/proc/x/out"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err


def test_export_of_a_spec_too_large_for_memory_is_refused(tmp_path, capsys, monkeypatch):
    from ltmdsl import tensorfile

    save_case("llama", tmp_path / "src")
    assert main(["import-hf", str(tmp_path / "src"), "-o", str(tmp_path / "l.ltm")]) == 0
    monkeypatch.setattr(tensorfile, "available_bytes", lambda: 1024)
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "l.ltm"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "GiB of memory available" in err and not (tmp_path / "out").exists()


def test_tiny_jamba_example_exports_to_a_folder_transformers_loads(tmp_path, capsys):
    """The bundled example that exports: every kind it has (attention, Mamba-1, MLP, MoE) maps to Jamba, the
    folder loads in transformers, and its logits equal the spec's own model with the same seed."""
    spec = EXAMPLES / "tiny-jamba.ltm"
    assert {layer.kind for layer in ltmdsl.load(spec).model.layers} == {"attention", "mamba", "mlp", "moe"}
    assert main(["export-hf", str(spec), str(tmp_path / "out"), "--seed", "4"]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "jamba" and cfg["num_hidden_layers"] == 8
    assert (cfg["attn_layer_period"], cfg["attn_layer_offset"]) == (4, 2)
    built = ltmdsl.build(ltmdsl.load(spec), seed=4)
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert_close(load_hf(tmp_path / "out")(ids).logits, built(ids), 1e-4, "tiny-jamba export")


def test_refusal_names_a_kind_whose_mapping_is_not_built(tmp_path, capsys, monkeypatch):
    """A kind transformers has but whose mapping is not built (every shipped kind is mapped today, so one is
    unmapped here) is named with its layer and model types, and nothing is written."""
    from ltmdsl.hf.facet import HFNotMappedYet
    from ltmdsl.kinds import hf as kinds_hf

    monkeypatch.setitem(kinds_hf.HF_REGISTRY, "short_conv", HFNotMappedYet("short_conv", ("lfm2",)))
    spec = tmp_path / "conv.ltm"
    spec.write_text("model m {\n vocab = 32\n d_model = 16\n layer c = short_conv()\n layer f = mlp(d_ff = 32)\n"
                    " stack { c f }\n}\n")
    assert main(["export-hf", str(spec), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "layer 0 'c': layer kind 'short_conv' has Hugging Face counterparts (model types lfm2" in err
    assert "but ltmdsl does not map them yet" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("example, expected", [
    ("stream-hybrid.ltm", ["layer 0 'ssm' (mamba2)", "layer 2 's1' (mamba)"]),
])
def test_refusal_names_the_layers_without_a_counterpart(tmp_path, capsys, example, expected):
    assert main(["export-hf", str(EXAMPLES / example), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "has no Hugging Face counterpart" in err and "The closest supported family is" in err
    for layer in expected:
        assert layer in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stack, family, misfit", [
    ("ssm ffn attn ffn ssm2 ffn", "Jamba", "layer 4 'ssm2' (mamba2): Jamba's SSM layers are Mamba-1"),
    ("ssm ffn rope ffn ssm ffn", "Jamba", "layer 2 'rope' (attention): Jamba attention has no RoPE and no window"),
    ("ssm ffn attn gelu", "Jamba", "layer 3 'gelu' (mlp): its activation is gelu; the family uses swiglu"),
    ("ssm2 attn ffn", "Nemotron-H", "layer 2 'ffn' (mlp): its activation is swiglu; Nemotron-H MLPs use relu2"),
    ("rope ffn rope", "Llama", "layer 2 'rope' (attention): a mixer without the FFN that must follow it"),
], ids=["mamba2-in-jamba", "rope-in-jamba", "gelu-in-jamba", "swiglu-in-nemotron", "unpaired-mixer"])
def test_misfits_name_index_definition_kind_and_reason(stack, family, misfit):
    from ltmdsl.hf.export import misfits

    text = f"""model m {{
    vocab = 40
    d_model = 32
    layer attn = attention(heads = 2, rope_theta = none)
    layer rope = attention(heads = 2)
    layer ssm = mamba(d_state = 4, inner_norms = true)
    layer ssm2 = mamba2(d_state = 8, head_dim = 16, chunk = 4)
    layer ffn = mlp(d_ff = 24)
    layer gelu = mlp(d_ff = 24, act = gelu)
    stack {{ {stack} }}
}}
"""
    ir = ltmdsl.loads(text).model
    message = misfits(ir)
    assert f"The closest supported family is {family}" in message and misfit in message
    with pytest.raises(HFError) as refused:
        config_from_ir(ir)
    assert misfit in refused.value.message  # the family's own reason, then the layers it has no place for


@pytest.mark.parametrize("variant", ["gate = true", "sinks = true", "softcap = 30.0", "query_pre_attn_scalar = 16.0",
                                     "rope_scaling = linear(factor = 2.0)"],
                         ids=["gate", "sinks", "softcap", "query_scalar", "linear-rope"])
def test_attention_variants_are_refused_not_exported_as_plain_attention(variant):
    """An attention variant no supported family carries is refused by name, never written as plain attention."""
    text = f"""model m {{
    vocab = 40
    d_model = 32
    layer attn = attention(heads = 2, {variant})
    layer ffn = mlp(d_ff = 24)
    stack {{ attn ffn }}
}}
"""
    with pytest.raises(HFError, match="not mapped to Hugging Face yet"):
        config_from_ir(ltmdsl.loads(text).model)


@pytest.mark.parametrize("variant", ["qk_l2_norm = true", "chunk = 8"], ids=["qk_l2_norm", "chunk"])
def test_llama4_attention_variants_export_as_llama4(variant):
    """Llama-4's L2 qk-norm and chunked attention map to llama4_text (tests/hf/test_hf_llama4.py has its parity)."""
    text = f"""model m {{
    vocab = 40
    d_model = 32
    layer attn = attention(heads = 2, {variant})
    layer ffn = mlp(d_ff = 24)
    stack {{ attn ffn }}
}}
"""
    ir = ltmdsl.loads(text).model
    cfg = config_from_ir(ir)
    assert cfg["model_type"] == "llama4_text" and cfg["moe_layers"] == []
    assert [x.mixer for x in ltmdsl.loads(spec_from_config(cfg)).model.layers] == [x.mixer for x in ir.layers]


@pytest.mark.parametrize("setting", ["embed_scale = 8.0", "residual_scale = 0.5", "logit_scale = 0.25",
                                     "logit_cap = 30.0"])
def test_model_scalars_are_refused_not_exported_as_plain_llama(setting):
    """A model-level scalar no supported family carries makes the export fail its round trip, by name; muP's
    scales make the stack Granite-4.0-H's (granitemoehybrid), which carries them."""
    from ltmdsl.hf.export import hf_plan

    text = f"""model m {{
    vocab = 40
    d_model = 32
    {setting}
    layer attn = attention(heads = 2)
    layer ffn = mlp(d_ff = 24)
    stack {{ attn ffn }}
}}
"""
    if setting != "logit_cap = 30.0":
        assert hf_plan(ltmdsl.loads(text).model)[0]["model_type"] == "granitemoehybrid"
        return
    with pytest.raises(HFError, match=f"does not map back .* {setting.split()[0]}"):
        hf_plan(ltmdsl.loads(text).model)
