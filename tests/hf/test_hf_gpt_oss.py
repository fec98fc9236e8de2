"""gpt-oss (model_type gpt_oss): the published gpt-oss-20b config imports to examples/gpt-oss-20b.ltm and to
transformers' exact parameter count; GptOssConfig's defaults (its YaRN when no RoPE is stated, sliding layers at
even indices) are ours; every bad field is an error naming its key. Tiny random transformers checkpoints (attention
sinks, YaRN past its original context, banded layers, biased router and clamped SwiGLU experts whose fused
gate_up_proj interleaves gate and up) load through from_hf with fp32 logits within 1e-4 relative and the same
greedy tokens through our cache as transformers' uncached decoding and its own cached generate, and export back
tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import EXAMPLES

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

CONFIG = Path(__file__).parent / "configs" / "gpt-oss-20b.json"
SMALL = {"model_type": "gpt_oss", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 4,
         "num_experts_per_tok": 2, "intermediate_size": 16, "sliding_window": 8}
#: tiny transformers checkpoints: GQA 3:1, head_dim 10; YaRN (factor 4 over 16 tokens, beta_fast 8) that prompts of
#: 19 tokens run past, a window of 5 on even layers, top-2 of 5 experts clamped at 1.5 (random activations reach
#: it); the second: MHA, plain RoPE, global layers only, no biases on attention, top-1 of 3, tied embeddings
HF_TINY = {
    "yarn_window": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 14, "num_attention_heads": 6,
                    "num_key_value_heads": 2, "head_dim": 10, "num_hidden_layers": 4, "num_local_experts": 5,
                    "num_experts_per_tok": 2, "sliding_window": 5, "swiglu_limit": 1.5, "max_position_embeddings": 64,
                    "rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "beta_fast": 8.0,
                                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16}},
    "plain_global": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 12, "num_attention_heads": 3,
                     "num_key_value_heads": 3, "head_dim": 12, "num_hidden_layers": 3, "num_local_experts": 3,
                     "num_experts_per_tok": 1, "attention_bias": False, "tie_word_embeddings": True,
                     "layer_types": ["full_attention"] * 3, "swiglu_alpha": 1.2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 300.0}},
}


def _model(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def test_published_config_is_the_example():
    """gpt-oss-20b: the example's sub-layers exactly, 20,914,757,184 parameters, transformers' count on meta."""
    cfg = json.loads(CONFIG.read_text())
    text = spec_from_config(cfg)
    assert "# NOTE" not in text
    ir, example = ltmdsl.loads(text).model, ltmdsl.load(EXAMPLES / "gpt-oss-20b.ltm").model
    assert [(x.norm, x.mixer) for x in ir.layers] == [(x.norm, x.mixer) for x in example.layers]
    assert ir.params_total == example.params_total == 20_914_757_184
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in hf.parameters()) == ir.params_total


def test_defaults_are_gpt_oss_configs():
    """No RoPE stated: GptOssConfig's YaRN (factor 32 over 4096, truncate false) at base 150000; no layer_types:
    sliding on even 0-based layers; attention biases and sinks; topk_softmax over biased experts."""
    ir = _model({k: v for k, v in SMALL.items()})
    attns = [x.mixer for x in ir.layers[0::2]]
    assert [a.window for a in attns] == [8, None, 8, None]
    s = attns[0].rope_scaling
    assert (attns[0].rope_theta, s.kind, s.factor, s.original_context, s.truncate) == (150000.0, "yarn", 32.0, 4096,
                                                                                         False)
    assert attns[0].sinks and attns[0].qkv_bias and attns[0].out_bias
    moe = ir.layers[1].mixer
    assert (moe.routing, moe.activation, moe.router_bias, moe.expert_bias, moe.swiglu_limit) == \
        ("topk_softmax", "swiglu_clamped", True, True, 7.0)
    plain = _model({**SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.layers[0].mixer.rope_scaling is None


@pytest.mark.parametrize("key, value, message", [
    ("num_experts_per_tok", 5, "num_experts_per_tok 5 > num_local_experts 4"),
    ("num_experts", 8, "'num_local_experts' 4 disagrees with 'num_experts' 8"),
    ("experts_per_token", 3, "'experts_per_token' 3 disagrees with 'num_experts_per_tok' 2"),
    ("initial_context_length", 2048, "'initial_context_length' 2048 disagrees with the YaRN original context 4096"),
    ("layer_types", ["full_attention"] * 3, "'layer_types' must list num_hidden_layers = 4"),
    ("layer_types", ["chunked_attention"] * 4, "'layer_types'"),
    ("swiglu_limit", 0, "'swiglu_limit' must be a positive finite number"),
    ("swiglu_alpha", "1.7", "'swiglu_alpha'"),
    ("attention_bias", 1, "'attention_bias' must be true or false"),
    ("hidden_act", 3, "'hidden_act' must be a string"),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0}, "'rope_parameters' = "),
    ("rope_parameters", {"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 16},
     "'rope_parameters.factor' must be a number >= 1"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "beta_fast": 1.0, "beta_slow": 2.0,
                         "original_max_position_embeddings": 16}, "must be greater than 'rope_parameters.beta_slow'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "cut": 1},
     "not cut"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
                         "truncate": "no"}, "'rope_parameters.truncate' must be true or false"),
    ("sliding_window", 0, "'sliding_window'"),
    ("head_dim", 7, "rotated head_dim must be even"),
    ("partial_rotary_factor", 0.5, "'partial_rotary_factor'"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("router_jitter", 0.1, "unknown config keys that may change the computation: router_jitter"),
], ids=lambda x: str(x)[:24])
def test_bad_fields_name_the_key(key, value, message):
    with pytest.raises(HFError) as e:
        spec_from_config({**SMALL, key: value})
    assert message in str(e.value)


def test_null_window_with_sliding_layers_is_refused():
    with pytest.raises(HFError, match="'sliding_window' is null but 'layer_types' has sliding_attention layers"):
        spec_from_config({**SMALL, "sliding_window": None})


@pytest.mark.parametrize("case", list(HF_TINY))
def test_logits_generation_and_round_trip_match_transformers(tmp_path, case):
    """fp32 logits within 1e-4 relative, 10 greedy tokens through our cache (ring buffers of the banded layers,
    sinks in the cached decode) equal to transformers' uncached decoding and its cached generate, and the export
    is the same checkpoint."""
    pytest.importorskip("transformers")
    from hf_parity import check_parity, check_round_trip, tiny

    hf = tiny("gpt_oss", HF_TINY[case])
    check_parity(hf, tmp_path / "src", f"gpt_oss {case}")
    check_round_trip(tmp_path / "src", tmp_path / "out", f"gpt_oss {case}")


def test_example_exports_to_gpt_oss():
    """export of examples/gpt-oss-20b.ltm: layer_types alternate, YaRN in rope_parameters, and it imports back."""
    from ltmdsl.hf.export import config_from_ir

    example = ltmdsl.load(EXAMPLES / "gpt-oss-20b.ltm").model
    cfg = config_from_ir(example)
    assert cfg["model_type"] == "gpt_oss" and cfg["sliding_window"] == 128
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 12
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["truncate"] is False
    assert [(x.norm, x.mixer) for x in _model(cfg).layers] == [(x.norm, x.mixer) for x in example.layers]


@pytest.mark.parametrize("attn, moe, message", [
    ("sinks = true, qk_norm = true", "act = swiglu_clamped, routing = topk_softmax, router_bias = true, "
     "expert_bias = true", "not qk_norm"),
    ("sinks = true, rope_scaling = linear(factor = 2)", "act = swiglu_clamped, routing = topk_softmax, "
     "router_bias = true, expert_bias = true", "plain or yarn, not linear"),
    ("sinks = true", "act = swiglu, routing = topk_softmax, router_bias = true, expert_bias = true",
     "act = swiglu,"),
    ("sinks = true", "act = swiglu_clamped, routing = topk_softmax, expert_bias = true",
     "topk_softmax with router_bias"),
], ids=["qk_norm", "linear_rope", "swiglu", "router_bias"])
def test_export_refuses_what_gpt_oss_cannot_hold(attn, moe, message):
    from ltmdsl.hf.export import config_from_ir

    text = (f"model m {{ vocab = 64 d_model = 32 norm = rmsnorm(eps = 1e-5) "
            f"layer a = attention(heads = 4, kv_heads = 2, {attn}) layer e = moe(experts = 4, top_k = 2, d_ff = 16, "
            f"{moe}) stack {{ repeat 2 {{ a e }} }} }}")
    with pytest.raises(HFError, match=message):
        config_from_ir(ltmdsl.loads(text).model)
