"""Llama 4 (model_type llama4_text): Llama4TextConfig's layout (NoPE layers every no_rope_layer_interval-th,
chunked attention on the RoPE layers, MoE every interleave_moe_layer_step-th, dense MLPs of intermediate_size_mlp
elsewhere, attention temperature tuning on the NoPE layers) imports with transformers' exact parameter count;
every bad field is an error naming its key. Tiny random transformers checkpoints (interleaved-pair RoPE
reordered per head, L2 qk-norm, chunks shorter than the prompt, temperature tuning that grows within the
prompt, sigmoid top-k experts on scaled inputs with a shared expert, fused transposed expert weights) load through
from_hf with fp32 logits within 1e-4 relative and the same greedy tokens through our cache as transformers'
uncached decoding and its own cached generate, and export back tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

SMALL = {"model_type": "llama4_text", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 16,
         "intermediate_size_mlp": 48, "num_local_experts": 4, "attention_chunk_size": 8,
         "floor_scale": 4, "attn_scale": 0.5}
#: tiny transformers checkpoints: GQA 3:1 with head_dim 10, NoPE every 2nd layer with temperature tuning (floor 4,
#: scale 0.5: the query scale grows within the prompt), chunks of 6 on the RoPE layers (prompts of 19 tokens span
#: four), MoE on odd layers (top-1 of 5, shared expert of 14), dense MLPs of 50; the
#: second: Llama 3.1 RoPE scaling past its 16-token original context, no chunks, no qk norm, top-2 of 3 experts
#: everywhere, q/k/v/o biases, tied embeddings
HF_TINY = {
    "chunked_nope": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 14, "intermediate_size_mlp": 50,
                     "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 10, "num_hidden_layers": 4,
                     "num_local_experts": 5, "num_experts_per_tok": 1, "attention_chunk_size": 6,
                     "interleave_moe_layer_step": 2, "floor_scale": 4, "attn_scale": 0.5, "no_rope_layer_interval": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    "llama3_top2": {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 12, "intermediate_size_mlp": 40,
                    "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 12, "num_hidden_layers": 3,
                    "num_local_experts": 3, "num_experts_per_tok": 2, "attention_chunk_size": None,
                    "use_qk_norm": False, "attention_bias": True, "tie_word_embeddings": True,
                    "no_rope_layers": [1, 1, 1], "max_position_embeddings": 64, "attn_temperature_tuning": False,
                    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0,
                                        "low_freq_factor": 0.5, "high_freq_factor": 2.0,
                                        "original_max_position_embeddings": 16}},
}


def _model(cfg: dict, **kw):
    return ltmdsl.loads(spec_from_config(cfg, **kw)).model


def test_layout_follows_llama4_text_config():
    """Defaults: NoPE on every 4th layer (1-based) without L2 norm or chunk, chunked L2-normed RoPE elsewhere, MoE
    on every layer (sigmoid top-1, input-weighted, shared expert as wide as the experts)."""
    ir = _model({**SMALL, "num_hidden_layers": 8})
    attns = [x.mixer for x in ir.layers[0::2]]
    assert [a.rope_theta is None for a in attns] == [False, False, False, True] * 2
    assert [a.chunk for a in attns] == [8, 8, 8, None] * 2
    assert [a.qk_l2_norm for a in attns] == [True, True, True, False] * 2
    moe = ir.layers[1].mixer
    assert (moe.routing, moe.top_k, moe.weight_input, moe.shared_d_ff, moe.d_ff) == ("sigmoid_topk", 1, True, 16, 16)
    mixed = _model({**SMALL, "interleave_moe_layer_step": 2, "no_rope_layers": [1, 0, 1, 1]})
    assert [x.kind for x in mixed.layers[1::2]] == ["mlp", "moe", "mlp", "moe"]
    assert mixed.layers[1].mixer.d_ff == 48
    assert [x.mixer.rope_theta is None for x in mixed.layers[0::2]] == [False, True, False, False]
    assert [x.kind for x in _model({**SMALL, "moe_layers": [0, 3]}).layers[1::2]] == ["moe", "mlp", "mlp", "moe"]


def test_published_scout_config_counts_as_transformers():
    """Llama-4-Scout-17B-16E (multimodal llama4): its text decoder, 48 layers (NoPE with temperature tuning every
    4th, chunked L2-normed RoPE with Llama 3.1 scaling 16x of 8192 with equal frequency factors elsewhere), 16
    experts top-1 and a shared expert everywhere: 107,769,861,120 parameters (17,172,894,720 active), transformers'
    count of its text model on the meta device; the vision part is left out with a NOTE."""
    cfg = json.loads((Path(__file__).parent / "configs" / "Llama-4-Scout-17B-16E.json").read_text())
    text = spec_from_config(cfg)
    assert text.count("# NOTE") == 1 and "'vision_config'" in text
    ir = ltmdsl.loads(text).model
    assert (ir.params_total, ir.params_active) == (107_769_861_120, 17_172_894_720)
    s = ir.layers[0].mixer.rope_scaling
    assert (s.kind, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_context) == ("llama3", 16.0, 1.0,
                                                                                             1.0, 8192)
    assert ir.layers[6].mixer.temperature_floor == 8192 and ir.layers[0].mixer.chunk == 8192
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg).text_config)
    assert sum(p.numel() for p in hf.parameters()) == ir.params_total


def test_default_config_counts_as_transformers():
    """Llama4TextConfig's defaults (Llama-4 Scout's text dimensions): the NoPE layers tune their temperature
    (floor 8192, scale 0.1), and the count is transformers' on the meta device."""
    text = spec_from_config({"model_type": "llama4_text"})
    assert "# NOTE" not in text
    ir = ltmdsl.loads(text).model
    nope = ir.layers[6].mixer
    assert (nope.rope_theta, nope.temperature_floor, nope.temperature_scale) == (None, 8192, 0.1)
    assert ir.layers[0].mixer.temperature_floor is None
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.Llama4TextConfig())
    assert sum(p.numel() for p in hf.parameters()) == ir.params_total == 107_769_861_120
    assert _model({"model_type": "llama4_text", "no_rope_layers": [1] * 48}).params_total == ir.params_total


@pytest.mark.parametrize("key, value, message", [
    ("attn_temperature_tuning", "yes", "'attn_temperature_tuning' must be true or false"),
    ("num_experts_per_tok", 5, "num_experts_per_tok 5 > num_local_experts 4"),
    ("no_rope_layers", [1, 0], "'no_rope_layers' must list num_hidden_layers = 4 of 0 / 1"),
    ("no_rope_layers", [2, 1, 1, 1], "'no_rope_layers'"),
    ("moe_layers", [4], "'moe_layers' must list 0-based layer indices below"),
    ("layer_types", ["sliding_attention"] * 4, "'layer_types' must list num_hidden_layers = 4"),
    ("attention_chunk_size", 0, "'attention_chunk_size'"),
    ("use_qk_norm", 1, "'use_qk_norm' must be true or false"),
    ("floor_scale", 0, "'floor_scale'"),
    ("floor_scale", 8.5, "'floor_scale' must be an integer"),
    ("attn_scale", -1, "'attn_scale'"),
    ("intermediate_size_mlp", 0, "'intermediate_size_mlp'"),
    ("hidden_act", "gelu", "'hidden_act' = 'gelu' is not supported"),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0}, "'rope_parameters' = "),
    ("head_dim", 7, "rotated head_dim must be even"),
    ("no_rope_layer_interval", 0, "'no_rope_layer_interval'"),
    ("for_llm_compressor", False, "unknown config keys that may change the computation: for_llm_compressor"),
], ids=lambda x: str(x)[:24])
def test_bad_fields_name_the_key(key, value, message):
    with pytest.raises(HFError) as e:
        spec_from_config({**SMALL, key: value})
    assert message in str(e.value)


def test_null_chunk_with_chunked_layers_is_refused():
    with pytest.raises(HFError, match="'attention_chunk_size' is null but 'layer_types' has chunked_attention"):
        spec_from_config({**SMALL, "attention_chunk_size": None, "layer_types": ["chunked_attention"] * 4})


@pytest.mark.parametrize("case", list(HF_TINY))
def test_logits_generation_and_round_trip_match_transformers(tmp_path, case):
    """fp32 logits within 1e-4 relative, 10 greedy tokens through our cache (chunk rings included) equal to
    transformers' uncached decoding and its cached generate, and the export is the same checkpoint (q/k rows back
    to interleaved pairs)."""
    pytest.importorskip("transformers")
    from hf_parity import check_parity, check_round_trip, tiny

    hf = tiny("llama4_text", HF_TINY[case])
    check_parity(hf, tmp_path / "src", f"llama4 {case}")
    check_round_trip(tmp_path / "src", tmp_path / "out", f"llama4 {case}")


@pytest.mark.parametrize("moe, message", [
    ("routing = sigmoid_topk, shared_d_ff = 8", "weight_input"),
    ("routing = sigmoid_topk, shared_d_ff = 16, weight_input = true", "as wide as its experts"),
    ("routing = softmax_topk_renorm, shared_d_ff = 16, weight_input = true", "routing = softmax_topk_renorm"),
], ids=["no_weight_input", "shared_width", "softmax"])
def test_export_refuses_what_llama4_cannot_hold(moe, message):
    from ltmdsl.hf.export import config_from_ir

    text = ("model m { vocab = 64 d_model = 32 norm = rmsnorm(eps = 1e-5) "
            "layer a = attention(heads = 4, kv_heads = 2, chunk = 8, qk_l2_norm = true) "
            f"layer e = moe(experts = 4, top_k = 1, d_ff = 8, {moe}) stack {{ repeat 2 {{ a e }} }} }}")
    with pytest.raises(HFError, match=message):
        config_from_ir(ltmdsl.loads(text).model)
