"""Gemma 3 (model_type gemma3_text, and the text decoder of gemma3 configs): the published gemma-3-27b-it config
imports to examples/gemma-3-27b.ltm with transformers' exact text-model count (its vision part left out with a
NOTE); per-layer-type RoPE (transformers 5's nested rope_parameters, or rope_theta / rope_local_base_freq /
rope_scaling), sliding_window_pattern and every bad field named. Tiny random transformers checkpoints (sandwich
zero-centred norms, zero-centred q/k norms, query_pre_attn_scalar, banded layers, linear-scaled global RoPE, a
final soft cap) load through from_hf with fp32 logits within 1e-4 relative and the same greedy tokens through
our cache as transformers' uncached decoding and its own cached generate, and export back tensor for tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from paths import EXAMPLES

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

CONFIG = Path(__file__).parent / "configs" / "gemma-3-27b-it.json"
SMALL = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48,
         "sliding_window": 8}
LOCAL_GLOBAL = {"sliding_attention": {"rope_type": "default", "rope_theta": 300.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0}}
#: tiny transformers checkpoints: GQA 3:1 with head_dim 10, local (window 5, base 300) and global (base 5000,
#: linear factor 4) layers alternating, softmax scale 17^-1/2, final logits capped at 3 (random logits reach it);
#: the second: sliding_window_pattern 3 (layers 0, 1 local, 2 global), exact GELU, MHA, untied, q/k/v/o biases
HF_TINY = {
    "local_global": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 50, "num_attention_heads": 6,
                     "num_key_value_heads": 2, "head_dim": 10, "num_hidden_layers": 4, "sliding_window": 5,
                     "layer_types": ["sliding_attention", "full_attention"] * 2, "query_pre_attn_scalar": 17,
                     "final_logit_softcapping": 3.0, "rope_parameters": LOCAL_GLOBAL},
    "pattern_gelu": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 40, "num_attention_heads": 3,
                     "num_key_value_heads": 3, "head_dim": 12, "num_hidden_layers": 3, "sliding_window": 4,
                     "sliding_window_pattern": 3, "hidden_activation": "gelu", "tie_word_embeddings": False,
                     "attention_bias": True, "query_pre_attn_scalar": 12},
}


def _model(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def test_published_config_is_the_example():
    """gemma-3-27b-it's text decoder: the example's sub-layers exactly and 27,009,346,304 parameters, the count of
    transformers' Gemma3ForCausalLM on its text_config (meta device); the multimodal model adds the vision part."""
    cfg = json.loads(CONFIG.read_text())
    text = spec_from_config(cfg)
    assert text.count("# NOTE") == 1 and "vision_config" in text and "text decoder" in text
    ir, example = ltmdsl.loads(text).model, ltmdsl.load(EXAMPLES / "gemma-3-27b.ltm").model
    assert [(x.norm, x.mixer, x.post_norm) for x in ir.layers] == \
        [(x.norm, x.mixer, x.post_norm) for x in example.layers]
    for what in ("vocab", "d_model", "dtype", "tie_embeddings", "final_norm", "embed_scale", "logit_cap"):
        assert getattr(ir, what) == getattr(example, what), what
    assert ir.params_total == example.params_total == 27_009_346_304
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg.text_config)
        whole = transformers.Gemma3ForConditionalGeneration(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == ir.params_total
    assert sum(p.numel() for p in whole.parameters()) == 27_432_406_640  # the published 27.4B


def test_rope_per_layer_type_in_both_forms():
    """transformers 5's nested rope_parameters and the older rope_theta / rope_local_base_freq / rope_scaling
    (global layers only) give the same layers; without either, bases 1e6 and 10000 (Gemma3TextConfig)."""
    six = {**SMALL, "num_hidden_layers": 6}
    nested = _model({**six, "rope_parameters": LOCAL_GLOBAL})
    flat = _model({**six, "rope_theta": 5000.0, "rope_local_base_freq": 300.0,
                   "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    assert [x.mixer for x in nested.layers] == [x.mixer for x in flat.layers]
    local, glob = nested.layers[0].mixer, nested.layers[10].mixer
    assert (local.window, local.rope_theta, local.rope_scaling) == (8, 300.0, None)
    assert (glob.window, glob.rope_theta, glob.rope_scaling.kind, glob.rope_scaling.factor) == (None, 5000.0,
                                                                                               "linear", 4.0)
    plain = _model(six)
    assert [x.mixer.rope_theta for x in plain.layers[0::2]] == [1e4] * 5 + [1e6]


def test_defaults_and_model_level_settings():
    """sliding_window_pattern 6 by default (every 6th layer global); zero-centred norms, post-norms on every
    sub-layer, embeddings scaled by sqrt(hidden_size), qk_norm and query_pre_attn_scalar 256."""
    ir = _model({**SMALL, "num_hidden_layers": 7})
    assert [x.mixer.window for x in ir.layers[0::2]] == [8] * 5 + [None, 8]
    assert ir.final_norm.zero_centred and all(x.post_norm == ir.final_norm for x in ir.layers)
    assert ir.embed_scale == math.sqrt(32) and ir.tie_embeddings and ir.logit_cap is None
    a = ir.layers[0].mixer
    assert a.qk_norm and a.query_pre_attn_scalar == 256 and ir.layers[1].mixer.activation == "geglu_tanh"


@pytest.mark.parametrize("key, value, message", [
    ("attn_logit_softcapping", 50.0, "'attn_logit_softcapping' = 50.0 is not supported"),
    ("use_bidirectional_attention", True, "'use_bidirectional_attention'"),
    ("hidden_activation", "relu", "'hidden_activation' = 'relu' is not supported"),
    ("query_pre_attn_scalar", 16.5, "'query_pre_attn_scalar' must be an integer"),
    ("final_logit_softcapping", -1, "'final_logit_softcapping'"),
    ("layer_types", ["full_attention"] * 3, "'layer_types' must list num_hidden_layers = 4"),
    ("sliding_window_pattern", 0, "'sliding_window_pattern'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4}, "'rope_parameters' must map"),
    ("rope_parameters", {"full_attention": {"rope_type": "dynamic", "factor": 2.0}},
     "'rope_parameters.full_attention.rope_type' = 'dynamic' is not supported"),
    ("rope_parameters", {"full_attention": {"rope_type": "linear", "factor": 0.5}},
     "'rope_parameters.full_attention.factor' must be a number >= 1"),
    ("rope_parameters", {"sliding_attention": {"rope_type": "default", "rope_theta": -1}},
     "'rope_parameters.sliding_attention.rope_theta' must be a positive number"),
    ("rope_parameters", {"sliding_attention": {"rope_type": "default", "factor": 2.0}},
     "'rope_parameters.sliding_attention' of rope_type 'default' has keys transformers does not read there: factor"),
    ("rope_scaling", {"rope_type": "linear", "factor": "8"}, "'rope_scaling.factor'"),
    ("rope_local_base_freq", 0, "'rope_local_base_freq.rope_theta' must be a positive number"),
    ("partial_rotary_factor", 0.5, "'partial_rotary_factor'"),
    ("head_dim", 7, "rotated head_dim must be even"),
    ("cache_implementation", "hybrid", "unknown config keys that may change the computation: cache_implementation"),
], ids=lambda x: str(x)[:24])
def test_bad_fields_name_the_key(key, value, message):
    with pytest.raises(HFError) as e:
        spec_from_config({**SMALL, key: value})
    assert message in str(e.value)


def test_multimodal_checkpoints_are_refused_by_name(tmp_path):
    """from_hf of a gemma3 (text and vision) checkpoint folder: an error that says why, before any tensor is read."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"model.vision_tower.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    cfg = json.loads(CONFIG.read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], **{
        k: v for k, v in SMALL.items() if k != "model_type"}}}))
    with pytest.raises(HFError, match="gemma3 checkpoints \\(text and vision\\) are not loaded"):
        ltmdsl.from_hf(tmp_path)


def test_multimodal_text_config_keys_are_checked_too():
    """A gemma3 config's text_config is accounted for key by key; its model_type must be gemma3_text."""
    cfg = json.loads(CONFIG.read_text())
    with pytest.raises(HFError, match="unknown config keys that may change the computation: rope_typo"):
        spec_from_config({**cfg, "text_config": {**cfg["text_config"], "rope_typo": 1}})
    with pytest.raises(HFError, match="'text_config.model_type' must be 'gemma3_text'"):
        spec_from_config({**cfg, "text_config": {**cfg["text_config"], "model_type": "gemma2"}})


@pytest.mark.parametrize("case", list(HF_TINY))
def test_logits_generation_and_round_trip_match_transformers(tmp_path, case):
    """fp32 logits within 1e-4 relative, 10 greedy tokens through our cache equal to transformers' uncached
    decoding and its cached generate, and the export is the same checkpoint (the zero-centred q/k norms to their
    scale 1 + w)."""
    pytest.importorskip("transformers")
    from hf_parity import check_parity, check_round_trip, tiny

    hf = tiny("gemma3_text", HF_TINY[case])
    check_parity(hf, tmp_path / "src", f"gemma3 {case}")
    check_round_trip(tmp_path / "src", tmp_path / "out", f"gemma3 {case}", centred=("q_norm.weight", "k_norm.weight"))


def test_example_exports_to_gemma3_text():
    """export of examples/gemma-3-27b.ltm: nested rope_parameters per layer type, layer_types, integer
    query_pre_attn_scalar; it imports back to the example."""
    from ltmdsl.hf.export import config_from_ir

    example = ltmdsl.load(EXAMPLES / "gemma-3-27b.ltm").model
    cfg = config_from_ir(example)
    assert cfg["model_type"] == "gemma3_text" and cfg["query_pre_attn_scalar"] == 168
    assert cfg["rope_parameters"] == {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    assert cfg["layer_types"].count("full_attention") == 10
    assert [(x.norm, x.mixer, x.post_norm) for x in _model(cfg).layers] == \
        [(x.norm, x.mixer, x.post_norm) for x in example.layers]


@pytest.mark.parametrize("change, message", [
    (("qk_norm = true", "qk_norm = true, softcap = 50"), "never applies attn_logit_softcapping"),
    (("act = geglu_tanh", "act = swiglu"), "GeGLU"),
    (("embed_scale = 6", "embed_scale = 5"), "sqrt\\(hidden_size\\)"),
    (("post_norm = post)", "post_norm = rmsnorm(eps = 1e-5, zero_centred = true))"), "one zero-centred rmsnorm"),
], ids=["softcap", "swiglu", "embed_scale", "post_norm_eps"])
def test_export_refuses_what_gemma3_cannot_hold(change, message):
    from ltmdsl.hf.export import config_from_ir

    text = ("model m { vocab = 64 d_model = 36 norm = rmsnorm(eps = 1e-6, zero_centred = true) embed_scale = 6 "
            "post = rmsnorm(eps = 1e-6, zero_centred = true) "
            "layer a = attention(heads = 4, kv_heads = 2, head_dim = 8, qk_norm = true, post_norm = post) "
            "layer f = mlp(d_ff = 48, act = geglu_tanh, post_norm = post) stack { repeat 2 { a f } } }")
    with pytest.raises(HFError, match=message):
        config_from_ir(ltmdsl.loads(text.replace(*change, 1)).model)
