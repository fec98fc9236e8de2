"""Qwen3-Next (model_type qwen3_next) import: the layer pattern from layer_types / full_attention_interval,
expert placement from decoder_sparse_step / mlp_only_layers, zero-centred norms, the published model's memory
report, and hostile config fields named in the error. Logits, generation and the round trip run with the
other families' tiny checkpoints (hf_tiny.CASES "qwen3_next", "qwen3_next_fused")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ltmdsl
from ltmdsl.cli import main
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config
from paths import EXAMPLES

CONFIG = Path(__file__).parent / "configs" / "Qwen3-Next-80B-A3B-Instruct.json"
#: a small config stating what the tests vary
SMALL = {"model_type": "qwen3_next", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "linear_num_key_heads": 2,
         "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "num_experts": 4,
         "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 8,
         "intermediate_size": 48}


def _kinds(cfg: dict) -> list[str]:
    return [layer.kind for layer in ltmdsl.loads(spec_from_config(cfg)).model.layers]


def test_published_config_is_the_example():
    """The example is `ltmdsl import-hf` of the committed config: 36 Gated DeltaNet and 12 attention layers
    (every 4th, 1-based), each followed by the MoE; every norm zero-centred."""
    cfg = json.loads(CONFIG.read_text())
    ir = ltmdsl.loads(spec_from_config(cfg, name="qwen3_next_80b_a3b")).model
    example = ltmdsl.load(EXAMPLES / "qwen3-next-80b-a3b.ltm").model
    assert [(x.mixer, x.norm) for x in ir.layers] == [(x.mixer, x.norm) for x in example.layers]
    assert ir.final_norm == example.final_norm and ir.final_norm.zero_centred
    mixers = [layer.kind for layer in example.layers[0::2]]
    assert mixers == ["gated_deltanet"] * 3 + ["attention"] + (["gated_deltanet"] * 3 + ["attention"]) * 11
    assert {layer.kind for layer in example.layers[1::2]} == {"moe"}
    attn = example.layers[6].mixer
    assert (attn.gate, attn.qk_norm, attn.rope_dim, attn.head_dim, attn.rope_theta) == (True, True, 64, 256, 1e7)


def test_memory_report_at_1m_shows_linear_state_beside_kv_cache(capsys):
    """`ltmdsl memory --context 1M`: the 12 attention layers' KV cache, 12 * 2 (k, v) * 2 KV heads * 256 * 2 B
    per token, beside the 36 Gated DeltaNet layers' constant state: conv taps 36 * (2*16*128 + 32*128) * 4 * 2 B
    and delta states 36 * 32 heads * 128 * 128 * 2 B."""
    assert main(["memory", str(EXAMPLES / "qwen3-next-80b-a3b.ltm"), "--context", "1M", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["by_kind"]["kv_cache"] == {"attention": 12 * 2 * 2 * 256 * 2 * 10**6}
    assert report["by_kind"]["recurrent_state"] == {"gated_deltanet/conv": 36 * (2 * 16 * 128 + 32 * 128) * 4 * 2,
                                                    "gated_deltanet/delta": 36 * 32 * 128 * 128 * 2}
    assert report["growth"]["kv_cache"] == "O(T)" and report["growth"]["recurrent_state"] == "O(1)"
    assert main(["memory", str(EXAMPLES / "qwen3-next-80b-a3b.ltm"), "--context", "1M"]) == 0
    text = capsys.readouterr().out
    assert "kv_cache           22.89 GiB" in text and "recurrent_state    38.25 MiB" in text


@pytest.mark.parametrize("change, mixers, ffns", [
    ({}, "LLLA", "EEEE"),
    ({"full_attention_interval": 2}, "LALA", "EEEE"),
    ({"layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention"],
      "full_attention_interval": 3}, "ALLA", "EEEE"),
    ({"decoder_sparse_step": 2}, "LLLA", "-E-E"),
    ({"mlp_only_layers": [0, 3]}, "LLLA", "-EE-"),
    ({"num_experts": 0}, "LLLA", "----"),
], ids=["interval-default", "interval-2", "layer_types-win", "sparse-step-2", "mlp-only", "no-experts"])
def test_layer_pattern(change, mixers, ffns):
    """Mixers as transformers' Qwen3NextConfig places them (layer_types, else attention on (i + 1) % interval
    == 0), experts where num_experts > 0, i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    kinds = _kinds({**SMALL, **change})
    symbol = {"gated_deltanet": "L", "attention": "A", "moe": "E", "mlp": "-"}
    assert "".join(symbol[k] for k in kinds[0::2]) == mixers
    assert "".join(symbol[k] for k in kinds[1::2]) == ffns


def test_small_config_counts_what_transformers_counts():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for change in ({}, {"mlp_only_layers": [1], "norm_topk_prob": False}, {"partial_rotary_factor": 0.5}):
        cfg = {**SMALL, **change}
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
        assert ltmdsl.loads(spec_from_config(cfg)).model.params_total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ["linear_attention"] * 3}, "'layer_types' must list num_hidden_layers = 4"),
    ({"layer_types": ["linear_attention"] * 3 + ["sliding_attention"]}, "'layer_types' must list"),
    ({"layer_types": "full_attention"}, "'layer_types' must list"),
    ({"mlp_only_layers": [4]}, "'mlp_only_layers' must list 0-based layer indices below num_hidden_layers = 4"),
    ({"mlp_only_layers": [True]}, "'mlp_only_layers' must list"),
    ({"linear_num_value_heads": 3}, "'linear_num_value_heads' \\(3\\) must be a multiple of 'linear_num_key_heads'"),
    ({"partial_rotary_factor": "1/4"}, "'partial_rotary_factor' must be a number in \\(0, 1\\]"),
    ({"partial_rotary_factor": 0.3}, "'partial_rotary_factor' = 0.3 rotates head_dim \\* factor"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 > num_experts 4"),
    ({"full_attention_interval": 0}, "'full_attention_interval' must be an integer"),
    ({"decoder_sparse_step": -1}, "'decoder_sparse_step' must be an integer"),
    ({"shared_expert_intermediate_size": 0}, "'shared_expert_intermediate_size' must be an integer"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ({"linear_conv_kernel_dim": 2.5}, "linear_conv_kernel_dim"),
    ({"some_new_key": 1}, "some_new_key"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_hostile_fields_name_the_key(change, message):
    with pytest.raises(HFError, match=message):
        spec_from_config({**SMALL, **change})


def test_gated_deltanet_is_refused_outside_qwen3_next(tmp_path, capsys):
    """Export sends Gated DeltaNet and zero-centred norms only to Qwen3-Next, whose other layers must fit."""
    spec = tmp_path / "m.ltm"
    spec.write_text("model m {\n vocab = 64\n d_model = 32\n norm = rmsnorm(eps = 1e-6)\n"
                    " layer gdn = gated_deltanet(key_heads = 2, head_dim = 8, chunk = 16)\n"
                    " layer ffn = mlp(d_ff = 48, act = swiglu)\n legend { L = gdn, \"-\" = ffn }\n"
                    " stack { repeat 2 { pattern \"L-\" } }\n}\n")
    assert main(["export-hf", str(spec), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "map back only to Qwen3-Next (zero-centred rmsnorm" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
