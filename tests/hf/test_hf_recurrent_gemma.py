"""RecurrentGemma (model_type recurrent_gemma): the published recurrentgemma-2b config is
examples/recurrentgemma-2b.ltm, the embedding scale is transformers' bf16 normalizer, transformers' cached
generate agrees with ours, export picks RecurrentGemma for zero-centred RG-LRU stacks, and every bad field is an
error naming its key.

(Logits parity, greedy generation through our cache and the HF -> ltmdsl -> HF round trip run for the
`recurrent_gemma` and `recurrent_gemma_exact` cases of hf_tiny.CASES in test_hf_load.py and test_hf_export.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from paths import EXAMPLES

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import bf16, spec_from_config

CONFIGS = Path(__file__).parent / "configs"
TINY = {"model_type": "recurrent_gemma", "vocab_size": 61, "hidden_size": 48, "intermediate_size": 100,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1}


def _published() -> dict:
    return json.loads((CONFIGS / "recurrentgemma-2b.json").read_text())


def _imported(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def test_recurrentgemma_2b_is_the_example():
    """The published config resolves to exactly the sub-layers, norms, scale and cap of the example: RG-LRU at
    18 layers, local attention at 0-based layers 2, 5, ..., 23, the tanh GeGLU, 2,682,862,080 parameters.
    (The checkpoint is stored in float32; the example serves it in bf16, so dtype is not compared.)"""
    cfg = _published()
    text = spec_from_config(cfg)
    assert "# NOTE" not in text
    ir, hand = _imported(cfg), ltmdsl.load(EXAMPLES / "recurrentgemma-2b.ltm").model
    assert [layer.index // 2 for layer in ir.layers if layer.kind == "attention"] == list(range(2, 26, 3))
    assert [(x.norm, x.mixer, x.post_norm) for x in ir.layers] == [(x.norm, x.mixer, x.post_norm) for x in hand.layers]
    for what in ("vocab", "d_model", "tie_embeddings", "final_norm", "embed_scale", "logit_cap"):
        assert getattr(ir, what) == getattr(hand, what), what
    assert ir.embed_scale == 50.5 and ir.logit_cap == 30.0 and ir.final_norm.zero_centred
    assert ir.params_total == hand.params_total == 2_682_862_080


@pytest.mark.parametrize("d, heads", [(36, 3), (48, 4), (2560, 10), (4096, 16), (3072, 12)])
def test_embed_scale_is_the_bf16_normalizer(d, heads):
    """transformers keeps sqrt(hidden_size) in a bfloat16 buffer; ours is the same number."""
    torch = pytest.importorskip("torch")
    assert bf16(math.sqrt(d)) == torch.tensor(d ** 0.5, dtype=torch.bfloat16).item()
    assert _imported({**TINY, "hidden_size": d, "num_attention_heads": heads}).embed_scale == \
        bf16(math.sqrt(d))


def test_transformers_cached_generate_agrees(tmp_path):
    """transformers' own generate, through its RG-LRU states and windowed KV cache, equals ours."""
    torch = pytest.importorskip("torch")
    from hf_tiny import save_case

    for case in ("recurrent_gemma", "recurrent_gemma_exact"):
        hf = save_case(case, tmp_path / case)
        ours = ltmdsl.from_hf(tmp_path / case)
        ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(6))
        want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        assert ours.generate(ids, 12).tolist() == want.tolist(), case


def test_export_writes_block_types_and_the_cap():
    from ltmdsl.hf.export import config_from_ir

    cfg = config_from_ir(ltmdsl.load(EXAMPLES / "recurrentgemma-2b.ltm").model)
    assert cfg["model_type"] == "recurrent_gemma" and cfg["block_types"] == ["recurrent", "recurrent", "attention"]
    assert cfg["logits_soft_cap"] == 30.0 and cfg["intermediate_size"] == 15360
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and cfg["attention_window_size"] == 2048


@pytest.mark.parametrize("change, message", [
    (("embed_scale = 50.5", "embed_scale = 50.0"), "embed_scale 50.0 != 50.5"),
    (("    logit_cap = 30.0\n", ""), "RecurrentGemma soft-caps its logits"),
    (("act = geglu_tanh", "act = swiglu"), "RecurrentGemma's MLPs are GeGLU"),
    (("window = 2048,", ""), "RecurrentGemma attention is local"),
], ids=["embed-scale", "no-cap", "swiglu", "no-window"])
def test_export_refuses_what_recurrent_gemma_cannot_hold(change, message):
    from ltmdsl.hf.export import hf_plan

    text = (EXAMPLES / "recurrentgemma-2b.ltm").read_text()
    assert change[0] in text
    with pytest.raises(HFError, match=message):
        hf_plan(ltmdsl.loads(text.replace(change[0], change[1])).model)


BAD = [
    ({"block_types": []}, "'block_types' must be a non-empty list of 'recurrent' / 'attention'"),
    ({"block_types": ["recurrent", "mamba"]}, "'block_types' must be a non-empty list"),
    ({"block_types": "recurrent"}, "'block_types' must be a non-empty list"),
    ({"block_types": ["attention"], "num_hidden_layers": 101}, "more than transformers' 100 repeats"),
    ({"layers_block_type": ["linear_attention"] * 4}, "'layers_block_type' disagrees with the layers"),
    ({"num_attention_heads": 5, "lru_width": 50}, "hidden_size 48 is not a multiple of num_attention_heads 5"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"head_dim": 16}, "'head_dim' = 16 is not supported"),
    ({"lru_width": 50}, "lru_width 50 is not a multiple of num_attention_heads 4"),
    ({"lru_width": 0}, "'lru_width' must be an integer from 1"),
    ({"conv1d_width": 0}, "'conv1d_width' must be an integer from 1"),
    ({"attention_window_size": -1}, "'attention_window_size' must be an integer from 1"),
    ({"logits_soft_cap": 0}, "'logits_soft_cap' must be a positive finite number"),
    ({"logits_soft_cap": "30"}, "'logits_soft_cap' must be a positive finite number"),
    ({"hidden_activation": "relu"}, "'hidden_activation' = 'relu' is not supported"),
    ({"embeddings_scale_by_sqrt_dim": False}, "'embeddings_scale_by_sqrt_dim' = False is not supported"),
    ({"intermediate_size": 1}, "'intermediate_size' must be an integer from 2"),
    ({"attention_bias": "no"}, "'attention_bias' must be true or false"),
    ({"rms_norm_eps": 0}, "'rms_norm_eps' must be a positive finite number"),
    ({"partial_rotary_factor": 0.25}, "'partial_rotary_factor' = 0.25 is not supported"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.3}}, "rotates head_dim \\* factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "'rope_parameters' = .* is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}}, "builds no scaled RoPE"),
    ({"final_logit_softcapping": 30.0}, "unknown config keys that may change the computation: final_logit_soft"),
]


@pytest.mark.parametrize("change, message", BAD, ids=["+".join(change) for change, _ in BAD])
def test_bad_recurrent_gemma_configs_are_clear_errors(change, message):
    with pytest.raises(HFError, match=message):
        spec_from_config({**TINY, **change})
