"""LFM2 (model_type lfm2): the published LFM2-700M config is examples/lfm2-700m.ltm, the MLP width follows
Lfm2MLP's sizing rule as transformers builds it, transformers' own cached generate agrees with ours, export
picks LFM2 for short-convolution stacks, and every bad field is an error naming its key.

(Logits parity, greedy generation through our cache and the HF -> ltmdsl -> HF round trip run for the `lfm2`
and `lfm2_adjusted` cases of hf_tiny.CASES in test_hf_load.py and test_hf_export.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import EXAMPLES

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

CONFIGS = Path(__file__).parent / "configs"
TINY = {"model_type": "lfm2", "vocab_size": 61, "hidden_size": 36, "intermediate_size": 90, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 2, "layer_types": ["conv", "full_attention", "conv"]}


def _published() -> dict:
    return json.loads((CONFIGS / "LFM2-700M.json").read_text())


def _imported(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def test_lfm2_700m_is_the_example():
    """The published config resolves to exactly the sub-layers, norms and head of examples/lfm2-700m.ltm:
    short convolutions at the 10 conv layers, attention at 0-based layers 2, 5, 8, 10, 12, 14, d_ff 6912."""
    cfg = _published()
    text = spec_from_config(cfg)
    assert "# NOTE" not in text
    ir, hand = _imported(cfg), ltmdsl.load(EXAMPLES / "lfm2-700m.ltm").model
    assert [layer.index // 2 for layer in ir.layers if layer.kind == "attention"] == [2, 5, 8, 10, 12, 14]
    assert {layer.mixer.d_ff for layer in ir.layers if layer.kind == "mlp"} == {6912}
    assert [(x.norm, x.mixer, x.post_norm) for x in ir.layers] == [(x.norm, x.mixer, x.post_norm) for x in hand.layers]
    for what in ("vocab", "d_model", "tie_embeddings", "final_norm", "embed_scale", "logit_cap", "dtype"):
        assert getattr(ir, what) == getattr(hand, what), what
    assert ir.params_total == hand.params_total == 742_489_344


@pytest.mark.parametrize("change, d_ff", [
    ({}, 64),  # int(2 * 90 / 3) = 60, times 1.0, rounded up to a multiple of block_multiple_of 64: 64
    ({"block_ffn_dim_multiplier": 1.5}, 128),  # int(1.5 * 60) = 90 -> 128
    ({"block_auto_adjust_ff_dim": False}, 90),
    ({"block_ff_dim": 30, "block_multiple_of": 8}, 24),  # the original configs' name wins, as in Lfm2Config
], ids=["default", "multiplier", "no-adjust", "block_ff_dim"])
def test_mlp_width_is_what_transformers_builds(change, d_ff):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = {**TINY, "block_multiple_of": 64, **change}
    assert {layer.mixer.d_ff for layer in _imported(cfg).layers if layer.kind == "mlp"} == {d_ff}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert model.model.layers[0].feed_forward.w1.out_features == d_ff


def test_full_attn_idxs_place_the_attention_layers():
    cfg = {k: v for k, v in TINY.items() if k != "layer_types"}
    attn = [layer.index // 2 for layer in _imported({**cfg, "full_attn_idxs": [0, 2]}).layers
            if layer.kind == "attention"]
    assert attn == [0, 2]
    assert all(layer.kind != "short_conv" for layer in _imported(cfg).layers)  # neither set: all attention


def test_transformers_cached_generate_agrees(tmp_path):
    """transformers' own generate, through its conv and KV caches, equals ours through our cache."""
    torch = pytest.importorskip("torch")
    from hf_tiny import save_case

    for case in ("lfm2", "lfm2_adjusted"):
        hf = save_case(case, tmp_path / case)
        ours = ltmdsl.from_hf(tmp_path / case)
        ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(5))
        want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        assert ours.generate(ids, 12).tolist() == want.tolist(), case


def test_export_picks_lfm2_for_short_convolutions():
    """A spec with short convolutions exports as LFM2, with its layer_types and the MLP width as is."""
    from ltmdsl.hf.export import config_from_ir

    cfg = config_from_ir(ltmdsl.load(EXAMPLES / "lfm2-700m.ltm").model)
    assert cfg["model_type"] == "lfm2" and cfg["intermediate_size"] == 6912
    assert cfg["block_auto_adjust_ff_dim"] is False and cfg["conv_L_cache"] == 3
    assert cfg["layer_types"] == _published()["layer_types"]


@pytest.mark.parametrize("spec, message", [
    ("layer c = short_conv(kernel = 3)\n layer a = attention(heads = 2, kv_heads = 1, head_dim = 8, "
     "rope_theta = 10000)\n layer f = mlp(d_ff = 32, act = swiglu)", "LFM2 attention has qk_norm and no biases"),
    ("layer c = short_conv(kernel = 3)\n layer a = attention(heads = 2, kv_heads = 1, head_dim = 8, "
     "rope_theta = 10000, qk_norm = true)\n layer f = mlp(d_ff = 32, act = gelu)", "LFM2's MLPs use swiglu"),
], ids=["no-qk-norm", "gelu"])
def test_export_refuses_what_lfm2_cannot_hold(spec, message):
    from ltmdsl.hf.export import config_from_ir

    text = (f"model m {{\n vocab = 50\n d_model = 16\n {spec}\n legend {{ C = c, A = a, \"-\" = f }}\n"
            " stack { pattern \"C-A-\" }\n}\n")
    with pytest.raises(HFError, match=message):
        config_from_ir(ltmdsl.loads(text).model)


BAD = [
    ({"layer_types": ["conv", "full_attention"]}, "'layer_types' lists 2 layers but 'num_hidden_layers' is 3"),
    ({"layer_types": ["conv", "mamba", "conv"]}, "'layer_types' must be a list of 'conv' / 'full_attention'"),
    ({"layer_types": "conv"}, "'layer_types' must be a list"),
    ({"full_attn_idxs": [0]}, "'full_attn_idxs' \\[0\\] disagrees with the attention layers of 'layer_types'"),
    ({"layer_types": None, "full_attn_idxs": [3]}, "'full_attn_idxs' must list 0-based layer indices below"),
    ({"layer_types": None, "full_attn_idxs": [True]}, "'full_attn_idxs' must list"),
    ({"num_heads": 3}, "'num_heads' = 3 disagrees with 'num_attention_heads' = 6"),
    ({"num_attention_heads": 5, "num_key_value_heads": 1}, "hidden_size 36 is not a multiple of num_attention_heads 5"),
    ({"num_key_value_heads": 4}, "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    ({"conv_L_cache": 0}, "'conv_L_cache' must be an integer from 1"),
    ({"conv_L_cache": 1e9}, "'conv_L_cache' must be an integer from 1 to 1,024"),
    ({"conv_bias": "yes"}, "'conv_bias' must be true or false"),
    ({"conv_dim": 48}, "'conv_dim' = 48 is not supported"),
    ({"block_dim": 48}, "'block_dim' = 48 is not supported"),
    ({"block_use_swiglu": False}, "'block_use_swiglu' = False is not supported"),
    ({"use_pos_enc": False}, "'use_pos_enc' = False is not supported"),
    ({"block_multiple_of": 0}, "'block_multiple_of' must be an integer from 1"),
    ({"block_ffn_dim_multiplier": -1.0}, "'block_ffn_dim_multiplier' must be a positive finite number"),
    ({"block_ffn_dim_multiplier": None}, "'block_ffn_dim_multiplier' must be a number"),
    ({"block_ffn_dim_multiplier": "2"}, "'block_ffn_dim_multiplier' must be a positive finite number"),
    ({"block_ffn_dim_multiplier": 1e-9}, "the MLP width from 'intermediate_size' 90"),
    ({"intermediate_size": 1}, "the MLP width from 'intermediate_size' 1"),
    ({"block_ff_dim": -4}, "'block_ff_dim' must be an integer from 1"),
    ({"tie_embedding": 1}, "'tie_embedding' must be true or false"),
    ({"norm_eps": 2.0}, "'norm_eps' must be a norm epsilon between 0 and 1"),
    ({"num_hidden_layers": 10**9}, "'num_hidden_layers' must be an integer from 1 to"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'rope_parameters' = .* is not supported"),
    ({"partial_rotary_factor": 0.5}, "'partial_rotary_factor' = 0.5 is not supported"),
    ({"conv_kernel": 4}, "unknown config keys that may change the computation: conv_kernel"),
]


@pytest.mark.parametrize("change, message", BAD, ids=["+".join(change) for change, _ in BAD])
def test_bad_lfm2_configs_are_clear_errors(change, message):
    cfg = {**TINY, **change}
    with pytest.raises(HFError, match=message):
        spec_from_config(cfg)
