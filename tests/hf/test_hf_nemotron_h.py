"""Nemotron-H and Nemotron-3 (model_type nemotron_h) as published: Nemotron-3-Nano-30B-A3B's config (MoE layers,
an SSM inner width that is not a multiple of the width) is examples/nemotron-3-nano-30b-a3b.ltm with the count
transformers gives; Nemotron-H-56B's config, with its copies of keys transformers does not read, imports; every
key that would change the computation is honoured or refused by name; the multi-token-prediction layers, which
transformers neither builds nor loads, are noted and their tensors skipped.

(Logits parity, greedy generation through our cache and the HF -> ltmdsl -> HF round trip run for the
`nemotron_h` and `nemotron_h_moe` cases of hf_tiny.CASES in test_hf_load.py and test_hf_export.py; the MoE block
alone is checked against transformers' NemotronHMoE in float64 in tests/runtime/test_rt_moe_variants.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import EXAMPLES

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

CONFIGS = Path(__file__).parent / "configs"
NANO = "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
H56 = "Nemotron-H-56B-Base-8K"
#: a small Nemotron-3-shaped config stating what the tests vary
SMALL = {"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32, "hybrid_override_pattern": "ME*E-",
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "mamba_num_heads": 4, "mamba_head_dim": 8,
         "n_groups": 2, "ssm_state_size": 8, "intermediate_size": 40, "n_routed_experts": 8, "num_experts_per_tok": 2,
         "moe_intermediate_size": 12, "moe_shared_expert_intermediate_size": 16, "n_group": 2, "topk_group": 1,
         "routed_scaling_factor": 2.5}


def published(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def imported(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def transformers_count(cfg: dict) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    return sum(p.numel() for p in model.parameters())


def test_nemotron_3_nano_is_the_example():
    """The published config resolves to exactly examples/nemotron-3-nano-30b-a3b.ltm: 23 Mamba-2 layers of 64 heads
    of 64 (an inner width of 4096 beside d_model 2688), 6 attention layers without RoPE, 23 MoE layers."""
    cfg = published(NANO)
    text = spec_from_config(cfg)
    assert "# NOTE" not in text
    ir, example = imported(cfg), ltmdsl.load(EXAMPLES / "nemotron-3-nano-30b-a3b.ltm").model
    assert [(x.norm, x.mixer) for x in ir.layers] == [(x.norm, x.mixer) for x in example.layers]
    assert (ir.vocab, ir.d_model, ir.tie_embeddings, ir.final_norm) == \
        (example.vocab, example.d_model, example.tie_embeddings, example.final_norm)
    symbol = {"mamba2": "M", "attention": "*", "moe": "E", "mlp": "-"}
    assert "".join(symbol[x.kind] for x in example.layers) == cfg["hybrid_override_pattern"]
    ssm = example.layers[0].mixer
    assert (ssm.heads, ssm.head_dim, ssm.d_inner) == (64, 64, 4096)
    moe = example.layers[1].mixer
    assert (moe.experts, moe.top_k, moe.d_ff, moe.activation, moe.routing, moe.selection_bias, moe.routed_scale,
            moe.shared_d_ff, moe.groups) == (128, 6, 1856, "relu2", "sigmoid_topk_renorm", True, 2.5, 3712, 1)


@pytest.mark.parametrize("name, count", [(NANO, 31_577_937_344), (H56, 56_324_350_464)], ids=["nano-30b", "h-56b"])
def test_published_counts_are_what_transformers_counts(name, count):
    """transformers 5.24 builds each published config on the meta device; ours counts the same, to the parameter
    (the experts' selection bias is a buffer there and is not counted here either)."""
    cfg = published(name)
    assert imported(cfg).params_total == count == transformers_count(cfg)


def test_nemotron_h_56b_keys_transformers_does_not_read():
    """The published 56B config carries `attention_head_dim`, `rms_norm_eps` and `time_step_rank`, which
    transformers' NemotronH never reads: accepted where they agree with what it reads, refused by name where not."""
    cfg = published(H56)
    assert {"attention_head_dim", "rms_norm_eps", "time_step_rank"} <= set(cfg)
    ir = imported(cfg)
    assert [x.kind for x in ir.layers].count("attention") == 10 and ir.layers[0].mixer.d_state == 256
    assert imported({**cfg, "time_step_rank": 7}).params_total == ir.params_total
    with pytest.raises(HFError, match="'attention_head_dim' 64 disagrees with the head_dim transformers uses \\(128"):
        imported({**cfg, "attention_head_dim": 64})
    with pytest.raises(HFError, match="'rms_norm_eps' 1e-06 disagrees with 'layer_norm_epsilon'"):
        imported({**cfg, "rms_norm_eps": 1e-6})


def test_default_config_is_transformers_default():
    """NemotronHConfig() is M, E, *, -: a MoE among the defaults, imported as transformers builds it."""
    cfg = {"model_type": "nemotron_h"}
    assert [x.kind for x in imported(cfg).layers] == ["mamba2", "moe", "attention", "mlp"]
    assert imported(cfg).params_total == transformers_count(cfg)


@pytest.mark.parametrize("change", [{}, {"norm_topk_prob": False, "n_group": 1, "topk_group": 1},
                                    {"layers_block_type": ["moe", "linear_attention", "mlp"]},
                                    {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}],
                         ids=["grouped", "ungrouped-no-renorm", "layer-list", "4-groups"])
def test_small_configs_count_what_transformers_counts(change):
    cfg = {**SMALL, **change}
    if "layers_block_type" in change:
        del cfg["hybrid_override_pattern"]
    moe = next(x.mixer for x in imported(cfg).layers if x.kind == "moe")
    assert moe.renormalise == cfg.get("norm_topk_prob", True) and moe.groups == cfg["n_group"]
    assert moe.top_groups == cfg["topk_group"] and moe.routed_scale == 2.5
    assert imported(cfg).params_total == transformers_count(cfg)


def test_multi_token_prediction_layers_are_noted_and_skipped(tmp_path):
    """num_nextn_predict_layers > 0: transformers builds no MTP layers and skips `mtp.*` tensors on load, so the
    import notes them and from_hf skips them too; the logits are those of the main model."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from hf_tiny import save_case

    cfg = {**SMALL, "num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*E"}
    text = spec_from_config(cfg)
    assert "# NOTE: 1 multi-token-prediction layer(s) (full_attention, moe) not imported" in text
    with pytest.raises(HFError, match="'mtp_hybrid_override_pattern' must be a string of M, \\*, - and E"):
        spec_from_config({**cfg, "mtp_hybrid_override_pattern": "*X"})
    hf = save_case("nemotron_h_moe", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(num_nextn_predict_layers=1, mtp_layers_block_type=["full_attention", "moe"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["mtp.layers.0.norm.weight"] = torch.ones(36)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ltmdsl.from_hf(tmp_path)(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_exported_spec_with_moe_loads_in_transformers(tmp_path):
    """A Nemotron-3-shaped spec (drawn weights, a nonzero selection bias) exports to a folder transformers loads
    to the same logits (fp32, 1e-4 relative) and back to the same model."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from helpers import assert_close
    from hf_tiny import load_hf

    from ltmdsl.hf.export import export_hf

    model = ltmdsl.build(ltmdsl.loads(spec_from_config(SMALL)), seed=3)
    with torch.no_grad():
        for layer in model.layers:
            if getattr(layer.mixer, "selection_bias", None) is not None:
                layer.mixer.selection_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    out = export_hf(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "ME*E-" and cfg["n_group"] == 2 and cfg["routed_scaling_factor"] == 2.5
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(load_hf(out)(ids).logits, model(ids), 1e-4, "exported Nemotron-3 logits")


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "'attention_bias' = True is not supported \\(supported: false \\(transformers' "
                               "NemotronHAttention has no biases"),
    ({"mlp_bias": True}, "'mlp_bias' = true gives Nemotron-H's shared experts biases"),
    ({"moe_latent_size": 16}, "'moe_latent_size' = 16 is not supported \\(supported: null \\(the latent projections"),
    ({"n_shared_experts": 2}, "'n_shared_experts' = 2 is not supported"),
    ({"n_group": 3}, "'n_group' 3 must divide 'n_routed_experts' 8"),
    ({"topk_group": 3}, "at least 'topk_group' 3"),
    ({"n_group": 8, "topk_group": 1}, "'n_routed_experts' / 'n_group' = 1"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 > the 4 experts that 'topk_group' 1 of 'n_group' 2"),
    ({"routed_scaling_factor": 0}, "'routed_scaling_factor' must be a positive finite number"),
    ({"norm_topk_prob": "yes"}, "'norm_topk_prob' must be true or false"),
    ({"num_local_experts": 4}, "'num_local_experts' 4 disagrees with 'n_routed_experts' 8"),
    ({"mlp_hidden_act": "silu"}, "mlp_hidden_act"),
    ({"hybrid_override_pattern": "MEX"}, "'hybrid_override_pattern' must be a string of M, \\*, - and E"),
    ({"num_hidden_layers": 7}, "'num_hidden_layers' 7 != the 5 layers of 'hybrid_override_pattern'"),
    ({"num_nextn_predict_layers": -1}, "'num_nextn_predict_layers' must be an integer"),
    ({"some_new_key": 1}, "some_new_key"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_hostile_fields_name_the_key(change, message):
    with pytest.raises(HFError, match=message):
        spec_from_config({**SMALL, **change})
