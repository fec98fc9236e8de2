"""Qwen3.5 (model types qwen3_5, qwen3_5_moe and their text-only forms): the language model of the published
vision-language configs (text_config; the vision part ignored by name) or of the flat text configs, counted
as transformers builds it, with every bad or inexpressible field an error naming its key.

Tiny random transformers models (dense and MoE, per-expert and fused layouts, and a vision-language
checkpoint whose language model sits under model.language_model beside a vision tower) load through from_hf
with fp32 logits within 1e-4 relative of transformers' and the same greedy tokens through our cache; export
with --family writes them back tensor for tensor (Gated DeltaNet's separate projections regrouped and split
again through op "rows")."""

from __future__ import annotations

import json

import pytest

import ltmdsl
from helpers import assert_close
from ltmdsl.cli import main
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

GDN = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 6,
       "linear_conv_kernel_dim": 3}
#: Dense: attention on 0-based layers 1 and 3 (layer_types), RoPE on half of head_dim 16 with the multimodal
#: sections (text-neutral), GQA 3:1. MoE: attention on layer 2 (full_attention_interval 3), the default quarter
#: of head_dim 16 rotated, 5 experts top 2 (always renormalised) and a gated shared expert of 10.
TINY = {
    "qwen3_5_text": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 50, "num_hidden_layers": 4,
                     "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
                     "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5,
                                         "mrope_section": [2, 1, 1], "mrope_interleaved": True}, **GDN},
    "qwen3_5_moe_text": {"vocab_size": 61, "hidden_size": 36, "num_hidden_layers": 3, "num_attention_heads": 3,
                         "num_key_value_heads": 1, "head_dim": 16, "full_attention_interval": 3, "num_experts": 5,
                         "num_experts_per_tok": 2, "moe_intermediate_size": 14, "shared_expert_intermediate_size": 10,
                         **GDN},
}
SMALL = {"model_type": "qwen3_5_text", **TINY["qwen3_5_text"]}
SMALL_MOE = {"model_type": "qwen3_5_moe_text", **TINY["qwen3_5_moe_text"]}
VISION = {"depth": 1, "hidden_size": 16, "intermediate_size": 20, "num_heads": 2, "out_hidden_size": 36,
          "patch_size": 4}


def _ir(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def _nested(flat: dict, outer: str) -> dict:
    """The vision-language form of a flat text config, as published checkpoints write it."""
    text = {k: v for k, v in flat.items() if k != "model_type"}
    return {"model_type": outer, "text_config": {"model_type": flat["model_type"], **text},
            "vision_config": VISION, "image_token_id": 60, "video_token_id": 59, "tie_word_embeddings": False}


def _hf(model_type: str, kwargs: dict, seed: int = 0):
    """A float32 transformers model with non-trivial random weights (eager experts: odd sizes)."""
    import transformers
    from hf_tiny import randomize

    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    if model_type in ("qwen3_5", "qwen3_5_moe"):
        cls = transformers.AutoModelForImageTextToText
    else:
        cls = transformers.AutoModelForCausalLM
    model = cls.from_config(cfg, experts_implementation="eager").float().eval()
    randomize(model, seed)
    return model


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text"])
def test_defaults_count_what_transformers_counts(model_type):
    """An empty config is Qwen3_5(Moe)(Text)Config's defaults; its language model has exactly the parameters
    transformers' Qwen3_5(Moe)ForCausalLM builds from them (on the meta device)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(model_type)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg.get_text_config())
    want = sum(p.numel() for p in model.parameters())
    assert _ir({"model_type": model_type}).params_total == want


@pytest.mark.parametrize("cfg", [SMALL, SMALL_MOE, {**SMALL, "tie_word_embeddings": True},
                                 {**SMALL_MOE, "full_attention_interval": 2, "linear_num_value_heads": 2}],
                         ids=["dense", "moe", "tied", "moe-interval-2"])
def test_small_configs_count_what_transformers_counts(cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert _ir(cfg).params_total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("flat, outer", [(SMALL, "qwen3_5"), (SMALL_MOE, "qwen3_5_moe")], ids=["dense", "moe"])
def test_vision_language_config_is_its_text_config(flat, outer):
    """The published form imports to the same language model as the flat one, with a NOTE that the vision
    encoder is left out; the family is the same."""
    nested = _nested(flat, outer)
    text = spec_from_config(nested)
    assert "# NOTE: the vision encoder (vision_config, model.visual.*) is not imported" in text
    a, b = ltmdsl.loads(text).model, _ir(flat)
    assert [(x.norm, x.mixer) for x in a.layers] == [(x.norm, x.mixer) for x in b.layers]
    assert a.params_total == b.params_total and a.final_norm.zero_centred


@pytest.mark.parametrize("change, mixers", [
    ({}, "LALA"),
    ({"layer_types": None}, "LLLA"),
    ({"layer_types": None, "full_attention_interval": 2}, "LALA"),
    ({"layer_types": ["full_attention"] * 4, "full_attention_interval": 3}, "AAAA"),
], ids=["layer_types", "interval-default", "interval-2", "layer_types-win"])
def test_layer_pattern(change, mixers):
    kinds = [x.kind for x in _ir({**SMALL, **change}).layers]
    assert "".join({"gated_deltanet": "L", "attention": "A"}[k] for k in kinds[0::2]) == mixers
    assert set(kinds[1::2]) == {"mlp"}


@pytest.mark.parametrize("cfg, message", [
    ({**SMALL, "layer_types": ["linear_attention"] * 3}, "'layer_types' must list num_hidden_layers = 4"),
    ({**SMALL, "num_experts": 4}, "qwen3_5_text: 'num_experts' = 4 is not supported (supported: absent (dense"),
    ({**SMALL, "mlp_only_layers": [1]}, "'mlp_only_layers'"),
    ({**SMALL_MOE, "intermediate_size": 64}, "'intermediate_size' = 64 is not supported (supported: absent (Qwen3.5 "
                                             "MoE"),
    ({**SMALL_MOE, "decoder_sparse_step": 2}, "'decoder_sparse_step' = 2 is not supported (supported: absent or 1"),
    ({**SMALL_MOE, "mlp_only_layers": [0]}, "'mlp_only_layers' = [0] is not supported"),
    ({**SMALL_MOE, "norm_topk_prob": False}, "'norm_topk_prob' = False is not supported (supported: true"),
    ({**SMALL_MOE, "num_experts_per_tok": 6}, "num_experts_per_tok 6 > num_experts 5"),
    ({**SMALL, "linear_num_value_heads": 3}, "'linear_num_value_heads' (3) must be a multiple"),
    ({**SMALL, "use_sliding_window": True}, "'use_sliding_window'"),
    ({**SMALL, "hidden_act": "gelu"}, "'hidden_act'"),
    ({**SMALL, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'rope_parameters'"),
    ({**SMALL, "rope_parameters": {"rope_type": "default", "mrope_section": [2, "1"]}},
     "'rope_parameters.mrope_section' must be a list of non-negative integers"),
    ({**SMALL, "rope_parameters": {"rope_type": "default", "mrope_interleaved": 1}},
     "'rope_parameters.mrope_interleaved' must be true or false"),
    ({**SMALL, "mtp_num_hidden_layers": -1}, "'mtp_num_hidden_layers' must be an integer"),
    ({**SMALL, "some_new_key": 1}, "unknown config keys that may change the computation: some_new_key"),
    ({**_nested(SMALL, "qwen3_5"), "text_config": [1]}, "qwen3_5: 'text_config' must be a JSON object"),
    ({**_nested(SMALL, "qwen3_5"), "vision_config": "big"}, "'vision_config' must be a JSON object"),
    ({**_nested(SMALL, "qwen3_5"), "tie_word_embeddings": True}, "'tie_word_embeddings' (True) disagrees with "
                                                                  "'text_config.tie_word_embeddings' (False)"),
    ({**_nested(SMALL, "qwen3_5_moe")}, "'text_config.model_type' must be 'qwen3_5_moe_text'"),
    ({**_nested(SMALL, "qwen3_5"), "image_token_id": "x"}, "'image_token_id' must be an integer"),
    ({**_nested(SMALL, "qwen3_5"), "deepstack": 1}, "qwen3_5: unknown config keys that may change the computation: "
                                                    "deepstack"),
    ({**_nested({**SMALL, "layer_types": ["x"] * 4}, "qwen3_5")}, "qwen3_5 text_config: 'layer_types' must list"),
    ({**_nested({**SMALL, "rope_dim": 8}, "qwen3_5")}, "qwen3_5 text_config: unknown config keys that may change "
                                                       "the computation: rope_dim"),
], ids=lambda v: None if isinstance(v, dict) else v[:30])
def test_hostile_fields_name_the_key(cfg, message):
    with pytest.raises(HFError) as e:
        spec_from_config(cfg)
    assert message in str(e.value)


def test_mtp_head_settings_are_harmless():
    cfg = {**SMALL, "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False}
    assert _ir(cfg).params_total == _ir(SMALL).params_total


# ---- against transformers: logits, generation through our cache, the round trip ------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model_type, fused) -> (folder, transformers model); built once per module."""
    root = tmp_path_factory.mktemp("qwen3_5")
    cache = {}

    def get(model_type: str, fused: bool = False):
        if (model_type, fused) not in cache:
            folder = root / f"{model_type}{'_fused' if fused else ''}"
            kwargs = TINY[model_type] if model_type in TINY else \
                {"text_config": TINY[f"{model_type}_text"], "vision_config": VISION}
            hf = _hf(model_type, kwargs)
            hf.save_pretrained(folder, save_original_format=not fused)
            cache[model_type, fused] = folder, hf
        return cache[model_type, fused]

    return get


@pytest.mark.parametrize("model_type, fused", [("qwen3_5_text", False), ("qwen3_5_moe_text", False),
                                               ("qwen3_5_moe_text", True), ("qwen3_5", False)],
                         ids=["dense", "moe", "moe-fused", "vision-language"])
def test_logits_and_greedy_generation_match_transformers(model_type, fused, saved):
    """fp32 logits within 1e-4 relative; 10 greedy tokens through our cache (conv taps, delta states, KV cache)
    equal transformers' uncached decoding. The vision-language checkpoint's tower (model.visual.*) is skipped."""
    torch = pytest.importorskip("torch")
    from hf_tiny import greedy_no_cache

    folder, hf = saved(model_type, fused)
    ours = ltmdsl.from_hf(folder)
    ids = torch.randint(0, 59, (2, 13), generator=torch.Generator().manual_seed(1))  # no image / video tokens
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert_close(got, want, 1e-4, f"{model_type} logits")
    assert ours.generate(ids[:1], 10).tolist() == greedy_no_cache(hf, ids[:1], 10).tolist()


def test_transformers_cached_generate_agrees(saved):
    """transformers' own generate, through its cache of conv taps, delta states and keys/values, equals ours."""
    torch = pytest.importorskip("torch")
    folder, hf = saved("qwen3_5_moe_text")
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(6))
    want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ltmdsl.from_hf(folder).generate(ids, 12).tolist() == want.tolist()


@pytest.mark.parametrize("model_type, fused", [("qwen3_5_text", False), ("qwen3_5_moe_text", False),
                                               ("qwen3_5_moe_text", True)], ids=["dense", "moe", "moe-fused"])
def test_round_trip_is_exact(model_type, fused, saved, tmp_path):
    """HF -> ltmdsl -> HF with --family: the same tensor names, the same tensors (the zero-centred q/k norms'
    1 + w bit for bit, as for Qwen3-Next), and transformers loads the export to the same logits."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from hf_tiny import load_hf
    from ltmdsl.hf.export import export_hf

    folder, hf = saved(model_type, fused)
    family = model_type.removesuffix("_text")
    export_hf(ltmdsl.from_hf(folder), tmp_path / "out", family=family, fused=fused)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == model_type
    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            assert torch.equal(1 + tensor, 1 + after[name]), name
        else:
            assert torch.equal(tensor, after[name]), name
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(load_hf(tmp_path / "out")(ids).logits, hf(ids).logits, 1e-5, f"exported {model_type} logits")


def test_export_family_choice(saved, tmp_path, capsys):
    """Without --family a Qwen3.5 stack exports as Qwen3-Next (the same computation); --family names the
    other; a family the model does not fit, or one that is not a choice, is an error naming it."""
    from ltmdsl.hf.export import config_from_ir

    dense, moe = ltmdsl.from_hf(saved("qwen3_5_text")[0]).ir, ltmdsl.from_hf(saved("qwen3_5_moe_text")[0]).ir
    assert config_from_ir(dense)["model_type"] == "qwen3_next"
    assert config_from_ir(moe, "qwen3_5_moe")["model_type"] == "qwen3_5_moe_text"
    with pytest.raises(HFError, match="this model maps to qwen3_next, not to qwen3_5_moe"):
        config_from_ir(dense, "qwen3_5_moe")
    with pytest.raises(HFError, match="--family 'llama' is not a family to choose"):
        config_from_ir(dense, "llama")
    spec = tmp_path / "m.ltm"
    spec.write_text(spec_from_config(SMALL))
    assert main(["export-hf", str(spec), str(tmp_path / "out"), "--family", "qwen3_5"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]


def test_only_the_vision_tower_and_mtp_head_are_skipped(saved, tmp_path):
    """A published checkpoint's multi-token-prediction head (mtp.*) is skipped like its vision tower; any other
    tensor the language model has no place for is still an error naming it."""
    torch = pytest.importorskip("torch")
    import shutil

    from safetensors.torch import load_file, save_file

    folder, hf = saved("qwen3_5")
    tensors = load_file(folder / "model.safetensors")
    assert any(name.startswith("model.visual.") for name in tensors)
    for extra, ok in (("mtp.fc.weight", True), ("model.language_model.extra.weight", False)):
        copy = tmp_path / extra
        shutil.copytree(folder, copy)
        save_file({**tensors, extra: torch.zeros(2, 2)}, str(copy / "model.safetensors"), metadata={"format": "pt"})
        if ok:
            ltmdsl.from_hf(copy)
        else:
            with pytest.raises(HFError, match=f"unexpected tensor {extra}"):
                ltmdsl.from_hf(copy)


def test_row_blocks_must_tile_each_tensor():
    """op "rows" declares row blocks that cover each checkpoint tensor exactly once (else export could not
    invert it); gather refuses a tensor with the wrong number of rows, naming it."""
    torch = pytest.importorskip("torch")
    from ltmdsl.hf.facet import Source
    from ltmdsl.hf.weights import gather

    src = Source(("a", "b"), "rows", ((0, 0, 2), (1, 0, 1), (0, 2, 3)))
    assert (src.part_rows(0), src.part_rows(1)) == (3, 1)
    for rows in (((0, 0, 2), (1, 0, 1), (0, 1, 3)), ((0, 1, 3), (1, 0, 1)), ((0, 0, 3),)):
        with pytest.raises(ValueError, match="must tile its rows from 0"):
            Source(("a", "b"), "rows", rows)
    with pytest.raises(ValueError, match="row blocks go with op 'rows'"):
        Source(("a",), "copy", ((0, 0, 1),))
    a, b = torch.arange(6.0).view(3, 2), torch.full((1, 2), -1.0)
    got = gather({"t": src}, {"a": a, "b": b}.__getitem__, {"t": (4, 2)})["t"]
    assert torch.equal(got, torch.cat([a[:2], b, a[2:]]))
    with pytest.raises(HFError, match="tensor b has shape \\[2, 2\\], expected 1 rows"):
        gather({"t": src}, {"a": a, "b": torch.zeros(2, 2)}.__getitem__, {"t": (4, 2)})


def test_moe_defaults_are_the_example_with_transformers_count():
    """Qwen3_5MoeTextConfig's defaults (documented by transformers as Qwen/Qwen3.5-35B-A3B) import to
    examples/qwen3.5-35b-a3b.ltm: 30 Gated DeltaNet and 10 gated attention layers, each before a MoE with a
    gated shared expert, 34,660,610,688 parameters as transformers builds them on the meta device."""
    from pathlib import Path

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[2]
    cfg = json.loads((root / "tests/hf/configs/Qwen3.5-35B-A3B-text-defaults.json").read_text())
    ir = ltmdsl.loads(spec_from_config(cfg, name="qwen3_5_35b_a3b")).model
    example = ltmdsl.load(root / "examples/qwen3.5-35b-a3b.ltm").model
    assert [(x.norm, x.mixer) for x in ir.layers] == [(x.norm, x.mixer) for x in example.layers]
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(Qwen3_5MoeTextConfig())
    assert example.params_total == sum(p.numel() for p in model.parameters()) == 34_660_610_688
