"""Granite-4.0-H (model_type granitemoehybrid): Mamba-2 and attention layers from layer_types, the MoE with its
always-present shared MLP (or the shared MLP alone without experts), the muP multipliers as the language's
model-level scalars and attention_multiplier as the attention's scale, both tensor layouts, export picking the
family, and every bad field an error naming its key.

(Logits parity, greedy generation through our cache and the HF -> ltmdsl -> HF round trip run for the
`granitemoehybrid`, `granitemoehybrid_fused` and `granitemoehybrid_dense` cases of hf_tiny.CASES in
test_hf_load.py and test_hf_export.py; the FFN block alone is checked against transformers' GraniteMoeHybridMoE
plus GraniteMoeHybridMLP in float64 in tests/runtime/test_rt_moe_variants.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import EXAMPLES

import ltmdsl
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

CONFIGS = Path(__file__).parent / "configs"

#: a small config stating what the tests vary
SMALL = {"model_type": "granitemoehybrid", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3,
         "layer_types": ["mamba", "attention", "mamba"], "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 12, "shared_intermediate_size": 16,
         "mamba_n_heads": 4, "mamba_d_state": 8, "mamba_chunk_size": 16, "embedding_multiplier": 12.0,
         "residual_multiplier": 0.22, "logits_scaling": 6.0, "attention_multiplier": 0.0078125,
         "position_embedding_type": "nope"}


def imported(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def transformers_count(cfg: dict) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    return sum(p.numel() for p in model.parameters())


def test_layers_and_mup_scalars():
    """layer_types' legacy names as transformers remaps them; the MoE with its shared MLP after every mixer; the
    four muP multipliers as embed_scale, residual_scale, logit_scale = 1 / logits_scaling and the attention's
    scale; no RoPE under position_embedding_type "nope"."""
    ir = imported(SMALL)
    assert [x.kind for x in ir.layers] == ["mamba2", "moe", "attention", "moe", "mamba2", "moe"]
    assert (ir.embed_scale, ir.residual_scale, ir.logit_scale) == (12.0, 0.22, 1 / 6.0)
    attn, moe = ir.layers[2].mixer, ir.layers[1].mixer
    assert (attn.scale, attn.score_scale, attn.rope_theta, attn.head_dim) == (0.0078125, 0.0078125, None, 8)
    assert (moe.routing, moe.activation, moe.shared_d_ff, moe.shared_gate) == ("topk_softmax", "swiglu", 16, False)
    listed = imported({**SMALL, "layer_types": ["linear_attention", "full_attention", "full_attention"]})
    assert [x.kind for x in listed.layers[0::2]] == ["mamba2", "attention", "attention"]


def test_attention_multiplier_of_head_dim_is_the_default_scale():
    """attention_multiplier = head_dim^-1/2 is the plain softmax scale: no `scale` in the spec."""
    cfg = {**SMALL, "attention_multiplier": 8 ** -0.5}
    assert imported(cfg).layers[2].mixer.scale is None
    assert "attention(heads = 4, kv_heads = 2, head_dim = 8, rope_theta = none)" in spec_from_config(cfg)


def test_no_experts_is_the_shared_mlp_alone():
    ir = imported({**SMALL, "num_local_experts": 0, "intermediate_size": None})
    assert [x.kind for x in ir.layers[1::2]] == ["mlp"] * 3
    assert (ir.layers[1].mixer.d_ff, ir.layers[1].mixer.activation) == (16, "swiglu")


@pytest.mark.parametrize("change", [{}, {"num_local_experts": 0}, {"position_embedding_type": "rope",
                                                                   "attention_bias": True},
                                    {"tie_word_embeddings": True, "mamba_n_groups": 2, "mamba_proj_bias": True}],
                         ids=["moe", "dense", "rope-bias", "tied-groups-projbias"])
def test_counts_are_what_transformers_counts(change):
    cfg = {**SMALL, **change}
    assert imported(cfg).params_total == transformers_count(cfg)


def test_checkpoint_layouts(tmp_path):
    """save_pretrained writes Granite's published names (block_sparse_moe.input_linear [E, 2F, d], router.layer)
    and, with save_original_format=False, transformers 5's (experts.gate_up_proj, router.weight); both load."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors import safe_open

    from hf_tiny import save_case

    for case, name in (("granitemoehybrid", "block_sparse_moe.input_linear.weight"),
                       ("granitemoehybrid_fused", "block_sparse_moe.experts.gate_up_proj")):
        save_case(case, tmp_path / case)
        names = set(safe_open(str(tmp_path / case / "model.safetensors"), "pt").keys())
        assert f"model.layers.0.{name}" in names and "model.layers.0.shared_mlp.input_linear.weight" in names
        ltmdsl.from_hf(tmp_path / case)


def test_transformers_cached_generate_agrees(tmp_path):
    """transformers' own cached generate (KV cache and Mamba-2 states) gives the tokens ours gives."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_tiny import save_case

    hf = save_case("granitemoehybrid", tmp_path)
    ids = torch.randint(0, 61, (1, 13), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ltmdsl.from_hf(tmp_path).generate(ids, 12).tolist() == want.tolist()


def test_spec_with_scalars_exports_to_granite(tmp_path):
    """A spec with muP scalars, an attention scale and a MoE with a shared expert exports as granitemoehybrid;
    transformers loads it to the same logits (fp32, 1e-4 relative)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from helpers import assert_close
    from hf_tiny import load_hf

    from ltmdsl.hf.export import export_hf

    spec = tmp_path / "g.ltm"
    spec.write_text("model g {\n vocab = 64\n d_model = 32\n dtype = fp32\n norm = rmsnorm(eps = 1e-5)\n"
                    " embed_scale = 2.5\n residual_scale = 0.4\n logit_scale = 0.3\n"
                    " layer ssm = mamba2(d_state = 8, head_dim = 16, chunk = 16)\n"
                    " layer attn = attention(heads = 4, kv_heads = 1, rope_theta = 1000, scale = 0.2)\n"
                    " layer moe = moe(experts = 4, top_k = 2, d_ff = 12, routing = topk_softmax, shared_d_ff = 8)\n"
                    " legend { M = ssm, A = attn, E = moe }\n stack { pattern \"ME AE ME\" }\n}\n")
    model = ltmdsl.build(ltmdsl.load(spec), seed=1)
    out = export_hf(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "granitemoehybrid" and cfg["position_embedding_type"] == "rope"
    assert (cfg["embedding_multiplier"], cfg["residual_multiplier"], cfg["attention_multiplier"]) == (2.5, 0.4, 0.2)
    assert 1.0 / cfg["logits_scaling"] == 0.3
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(load_hf(out)(ids).logits, model(ids), 1e-4, "exported Granite-4.0-H logits")


def test_export_refuses_what_granite_cannot_hold(tmp_path):
    """A sliding window in a stack with muP scales: refused, saying why Granite-4.0-H has no place for it."""
    from ltmdsl.hf.export import config_from_ir

    ir = ltmdsl.loads("model g {\n vocab = 64\n d_model = 32\n residual_scale = 0.5\n"
                      " layer attn = attention(heads = 4, window = 8, rope_theta = none)\n"
                      " layer ffn = mlp(d_ff = 16)\n stack { attn ffn }\n}\n").model
    with pytest.raises(HFError, match="^Granite-4.0-H attention has RoPE over the whole head or none, no window"):
        config_from_ir(ir)


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ["mamba", "attention"]}, "'layer_types' must list num_hidden_layers = 3"),
    ({"layer_types": ["mamba", "moe", "mamba"]}, "'layer_types' must list"),
    ({"position_embedding_type": "alibi"}, "'position_embedding_type' must be null, 'nope' or 'rope'"),
    ({"attention_multiplier": 0}, "'attention_multiplier' must be a positive finite number"),
    ({"embedding_multiplier": -1}, "'embedding_multiplier' must be a positive finite number"),
    ({"residual_multiplier": "0.2"}, "'residual_multiplier' must be a positive finite number"),
    ({"logits_scaling": 0}, "'logits_scaling' must be a positive finite number"),
    ({"num_local_experts": -1}, "'num_local_experts' must be an integer"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 must be from 1 to num_local_experts 4"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok 0 must be from 1 to num_local_experts 4"),  # 0: no experts
    ({"shared_intermediate_size": 0}, "'shared_intermediate_size' must be an integer"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "'head_dim' = 16 is not supported"),
    ({"num_attention_heads": 5}, "hidden_size 32 is not a multiple of num_attention_heads 5"),
    ({"mamba_n_heads": 5}, "mamba_n_heads 5 does not divide mamba_expand \\* hidden_size = 64"),
    ({"normalization_function": "layernorm"}, "normalization_function"),
    ({"position_embedding_type": "rope", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ({"some_new_key": 1}, "some_new_key"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_hostile_fields_name_the_key(change, message):
    with pytest.raises(HFError, match=message):
        spec_from_config({**SMALL, **change})


#: tests/hf/configs/<name>.json -> (parameters, active parameters), as transformers 5.24 builds them on the meta
#: device. The configs hold Granite-4.0-H's published architecture (IBM's model cards: 40 layers, 4 of them
#: attention at 0-based 5, 15, 25, 35 (9 Mamba-2 : 1 attention), NoPE, vocabulary 100352, tied embeddings;
#: Small 4096 wide, 72 experts of 768, top 10, shared 1536; Tiny 1536 wide, 64 experts of 512, top 6, shared 1024;
#: Micro 2048 wide, dense, shared MLP 8192, its num_local_experts and num_experts_per_tok 0) and
#: GraniteMoeHybridConfig's defaults elsewhere. Uncertain, so left out: the muP multipliers (embedding_multiplier,
#: residual_multiplier, attention_multiplier, logits_scaling), which change no count. The model cards' totals,
#: 32B (9B active), 7B (1B active) and 3B, agree.
GRANITE_PUBLISHED = {"granite-4.0-h-small": (32_207_337_984, 8_803_121_664),
                     "granite-4.0-h-tiny": (6_939_037_248, 1_465_470_528),
                     "granite-4.0-h-micro": (3_191_396_096, 3_191_396_096)}


@pytest.mark.parametrize("name", sorted(GRANITE_PUBLISHED))
def test_published_configs_count_what_transformers_counts(name):
    """Every key of the published configs is accounted for (no NOTE), and the counts are transformers'."""
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    text = spec_from_config(cfg)
    assert "# NOTE" not in text
    ir = ltmdsl.loads(text).model
    assert (ir.params_total, ir.params_active) == GRANITE_PUBLISHED[name]
    assert ir.params_total == transformers_count(cfg)


def test_small_is_the_example():
    """examples/granite-4.0-h-small.ltm is the import of its published config, sub-layer for sub-layer."""
    cfg = json.loads((CONFIGS / "granite-4.0-h-small.json").read_text())
    ir, example = imported(cfg), ltmdsl.load(EXAMPLES / "granite-4.0-h-small.ltm").model
    assert [(x.norm, x.mixer) for x in ir.layers] == [(x.norm, x.mixer) for x in example.layers]
    assert (example.tie_embeddings, example.vocab, example.d_model) == (True, 100352, 4096)
    assert [i for i, x in enumerate(example.layers[0::2]) if x.kind == "attention"] == [5, 15, 25, 35]


def test_init_method_is_initialisation_only():
    """Granite's `init_method` ("mup") says how weights were drawn for training: the same spec, no NOTE."""
    assert spec_from_config({**SMALL, "init_method": "mup"}) == spec_from_config(SMALL)
