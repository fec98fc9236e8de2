"""Qwen3-MoE (model_type qwen3_moe): the published Qwen3-30B-A3B config imports to transformers' exact parameter
count, experts sit where decoder_sparse_step / mlp_only_layers put them, and every bad field is an error naming
its key. Tiny random transformers checkpoints (per-expert and fused experts) load through from_hf with fp32
logits within 1e-4 relative and the same greedy tokens through our cache, and export back tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

CONFIG = Path(__file__).parent / "configs" / "Qwen3-30B-A3B.json"
SMALL = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 16, "intermediate_size": 48}
#: tiny transformers checkpoints: GQA 3:1 with head_dim 10 (not d / heads), q/k/v/o biases, a window of 5 on
#: every layer (prompts of 19 tokens), renormalised top-2 of 5 experts and a dense MLP at layer 2; the second
#: has no window, MHA of head_dim 12, top-3 of 4 without renormalising, experts on odd layers only, tied embeddings
HF_TINY = {
    "window_bias": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 50, "num_attention_heads": 6,
                    "num_key_value_heads": 2, "head_dim": 10, "num_hidden_layers": 4, "num_experts": 5,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 14, "norm_topk_prob": True,
                    "mlp_only_layers": [2], "use_sliding_window": True, "sliding_window": 5, "attention_bias": True},
    "sparse_step": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 40, "num_attention_heads": 3,
                    "num_key_value_heads": 3, "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 3,
                    "moe_intermediate_size": 12, "decoder_sparse_step": 2, "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 300.0}},
}


def _model(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def test_published_config_has_transformers_parameter_count():
    """Qwen3-30B-A3B: 48 x (attention + 128 experts, top 8 renormalised), 30,532,122,624 parameters, the count
    of transformers' Qwen3MoeForCausalLM built on the meta device."""
    cfg = json.loads(CONFIG.read_text())
    text = spec_from_config(cfg)
    assert "# NOTE" not in text
    ir = ltmdsl.loads(text).model
    assert ir.params_total == 30_532_122_624
    moe = ir.layers[1].mixer
    assert (moe.experts, moe.top_k, moe.d_ff, moe.routing) == (128, 8, 768, "softmax_topk_renorm")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in hf.parameters()) == ir.params_total


@pytest.mark.parametrize("extra, kinds", [
    ({}, ["moe"] * 4),
    ({"mlp_only_layers": [0, 3]}, ["mlp", "moe", "moe", "mlp"]),
    ({"decoder_sparse_step": 2}, ["mlp", "moe", "mlp", "moe"]),
    ({"num_experts": 0}, ["mlp"] * 4),
    ({"num_local_experts": 4, "num_experts": None}, ["moe"] * 4),
], ids=["all", "mlp_only_layers", "sparse_step", "no_experts", "num_local_experts"])
def test_experts_sit_where_transformers_puts_them(extra, kinds):
    ir = _model({**SMALL, **extra})
    assert [x.kind for x in ir.layers[1::2]] == kinds


def test_window_is_every_layers_and_max_window_layers_is_not_read():
    """use_sliding_window slides every layer (Qwen3MoeConfig has no max_window_layers); off, no window."""
    ir = _model({**SMALL, "use_sliding_window": True, "sliding_window": 7, "max_window_layers": 2})
    assert {x.mixer.window for x in ir.layers[0::2]} == {7}
    assert {x.mixer.window for x in _model({**SMALL, "sliding_window": 7}).layers[0::2]} == {None}


@pytest.mark.parametrize("key, value, message", [
    ("num_experts_per_tok", 5, "num_experts_per_tok 5 > num_experts 4"),
    ("num_local_experts", 8, "'num_experts' 4 disagrees with 'num_local_experts' 8"),
    ("mlp_only_layers", [4], "'mlp_only_layers' must list 0-based layer indices below"),
    ("mlp_only_layers", "0", "'mlp_only_layers'"),
    ("decoder_sparse_step", 0, "'decoder_sparse_step'"),
    ("norm_topk_prob", "yes", "'norm_topk_prob' must be true or false"),
    ("hidden_act", "gelu", "'hidden_act' = 'gelu' is not supported"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0}, "'rope_parameters' = "),
    ("partial_rotary_factor", 0.5, "'partial_rotary_factor'"),
    ("moe_intermediate_size", -1, "'moe_intermediate_size'"),
    ("layer_types", ["full_attention"] * 4, "unknown config keys that may change the computation: layer_types"),
], ids=lambda x: str(x)[:24])
def test_bad_fields_name_the_key(key, value, message):
    with pytest.raises(HFError) as e:
        spec_from_config({**SMALL, key: value})
    assert message in str(e.value)


def test_yarn_is_read_and_written_back():
    """Qwen's long-context YaRN (rope_scaling yarn, factor 4 over 32768 tokens) imports and exports as is."""
    from ltmdsl.hf.export import config_from_ir

    ir = _model({**SMALL, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 32768}})
    s = ir.layers[0].mixer.rope_scaling
    assert (s.kind, s.factor, s.original_context, s.beta_fast, s.beta_slow, s.truncate) == \
        ("yarn", 4.0, 32768, 32.0, 1.0, True)
    cfg = config_from_ir(ir)
    assert cfg["model_type"] == "qwen3_moe" and cfg["rope_scaling"]["rope_type"] == "yarn"
    assert _model(cfg).layers[0].mixer == ir.layers[0].mixer


@pytest.mark.parametrize("case, fused", [("window_bias", False), ("window_bias", True), ("sparse_step", False)],
                         ids=["window_bias", "window_bias_fused", "sparse_step"])
def test_logits_generation_and_round_trip_match_transformers(tmp_path, case, fused):
    """fp32 logits within 1e-4 relative, 10 greedy tokens through our cache equal to transformers' uncached
    decoding and its cached generate, and the export is the same checkpoint (per-expert or fused, as saved)."""
    pytest.importorskip("transformers")
    from hf_parity import check_parity, check_round_trip, tiny

    hf = tiny("qwen3_moe", HF_TINY[case])
    check_parity(hf, tmp_path / "src", f"qwen3_moe {case}", save_original_format=not fused)
    check_round_trip(tmp_path / "src", tmp_path / "out", f"qwen3_moe {case}", fused=fused)


@pytest.mark.parametrize("moe, message", [
    ("moe(experts = 4, top_k = 2, d_ff = 16, routing = softmax_topk, shared_d_ff = 8)", "shared_d_ff"),
    ("moe(experts = 4, top_k = 2, d_ff = 16, routing = sigmoid_topk_renorm)", "routing = sigmoid_topk_renorm"),
    ("moe(experts = 4, top_k = 2, d_ff = 16, routing = softmax_topk, expert_bias = true)", "expert_bias"),
], ids=["shared", "sigmoid", "bias"])
def test_export_refuses_what_qwen3_moe_cannot_hold(moe, message):
    from ltmdsl.hf.export import config_from_ir

    text = (f"model m {{ vocab = 64 d_model = 32 norm = rmsnorm(eps = 1e-6) "
            f"layer a = attention(heads = 4, kv_heads = 2, qk_norm = true) layer e = {moe} "
            f"stack {{ repeat 2 {{ a e }} }} }}")
    with pytest.raises(HFError, match=message):
        config_from_ir(ltmdsl.loads(text).model)
