"""Kimi-Linear (model_type kimi_linear): KimiLinearConfig's defaults
(tests/hf/configs/Kimi-Linear-48B-A3B-Instruct.json) import to examples/kimi-linear-48b-a3b.ltm with transformers' exact count; the layer placement, the MoE keys under
their saved names and aliases, and every bad field an error naming its key.

Tiny random transformers models (KDA, NoPE MLA with and without a q low-rank, dense MLPs, experts with grouped
sigmoid routing, a random selection bias and shared experts) load through from_hf from both checkpoint layouts
(the published one: separate q/k/v convs, the forget gate's tensors under self_attn, per-expert w1/w3/w2 under
block_sparse_moe; transformers' own) with fp32 logits within 1e-4 relative of transformers' and the same greedy
tokens through our cache; export writes them back tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import EXAMPLES

import ltmdsl
from helpers import assert_close
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

CONFIG = Path(__file__).parent / "configs" / "Kimi-Linear-48B-A3B-Instruct.json"
#: KDA (2 heads of 8, 3 taps) on 0-based layers 0 and 2, NoPE MLA (3 heads, full-rank q, latent 10, nope 8, rope 4,
#: value 6) on 1 and 3; a dense MLP on layer 0, then 6 experts in 2 groups (1 kept), top 2, renormalised, times
#: 1.7, and two shared experts (one MLP of 20).
TINY = {"vocab_size": 61, "hidden_size": 36, "intermediate_size": 50, "num_hidden_layers": 4,
        "num_attention_heads": 3, "num_key_value_heads": 3, "q_lora_rank": None, "kv_lora_rank": 10,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
        "first_k_dense_replace": 1, "linear_attn_config": {"num_heads": 2, "head_dim": 8, "short_conv_kernel_size": 3},
        "num_experts": 6, "num_experts_per_token": 2, "num_expert_group": 2, "topk_group": 1,
        "moe_intermediate_size": 10, "num_shared_experts": 2, "routed_scaling_factor": 1.7, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2}
#: The other variant: a q low-rank of 12, top 3 of 5 ungrouped experts without renormalising, dense MLPs on the first
#: two layers, placement from linear_attn_config (1-based), flat KDA sizes (4 heads of 6, 4 taps).
TINY_Q = {**{k: v for k, v in TINY.items() if k not in ("layer_types", "linear_attn_config")},
          "num_hidden_layers": 3, "q_lora_rank": 12, "first_k_dense_replace": 2, "num_experts": 5,
          "num_experts_per_token": 3, "num_expert_group": 1, "moe_renormalize": False, "linear_num_heads": 4,
          "linear_head_dim": 6, "linear_conv_kernel_dim": 4,
          "linear_attn_config": {"full_attn_layers": [3], "kda_layers": [1, 2]}}
SMALL = {"model_type": "kimi_linear", **TINY}


def _ir(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def _symbols(ir) -> tuple[str, str]:
    sym = {"kda": "K", "mla": "A", "mlp": "-", "moe": "E"}
    kinds = [x.kind for x in ir.layers]
    return "".join(sym[k] for k in kinds[0::2]), "".join(sym[k] for k in kinds[1::2])


def test_defaults_are_the_example_with_transformers_count():
    """KimiLinearConfig's defaults (its saved key names) resolve to exactly the example: 21 KDA and 6 NoPE MLA
    layers, a dense MLP then 26 MoE layers, 49,133,074,464 parameters as transformers builds them (meta device)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = json.loads(CONFIG.read_text())
    text = spec_from_config(cfg, name="kimi_linear_48b_a3b")
    assert "# NOTE" not in text
    ir, example = ltmdsl.loads(text).model, ltmdsl.load(EXAMPLES / "kimi-linear-48b-a3b.ltm").model
    assert [(x.norm, x.mixer) for x in ir.layers] == [(x.norm, x.mixer) for x in example.layers]
    assert _symbols(example) == ("KKKKAKKKAKKKAKKKAKKKAKKKAKK", "-" + "E" * 26)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.KimiLinearConfig())
    assert example.params_total == sum(p.numel() for p in model.parameters()) == 49_133_074_464
    assert example.layers[8].mixer.rope_theta is None


@pytest.mark.parametrize("cfg", [SMALL, {"model_type": "kimi_linear", **TINY_Q},
                                 {**SMALL, "first_k_dense_replace": 0, "num_shared_experts": 0}],
                         ids=["tiny", "q-lora", "no-dense-no-shared"])
def test_small_configs_count_what_transformers_counts(cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert _ir(cfg).params_total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("change, mixers, ffns", [
    ({}, "KAKA", "-EEE"),
    ({"layer_types": None, "linear_attn_config": {}}, "KKKK", "-EEE"),
    ({"layer_types": None, "num_hidden_layers": 6, "linear_attn_config": {}}, "KKKKAK", "-EEEEE"),
    ({"layer_types": None, "linear_attn_config": {"full_attn_layers": [1, 4], "kda_layers": [2, 3]}}, "AKKA", "-EEE"),
    ({"first_k_dense_replace": None, "mlp_layer_types": ["sparse", "dense", "sparse", "dense"]}, "KAKA", "E-E-"),
    ({"first_k_dense_replace": None}, "KAKA", "-EEE"),
    ({"first_k_dense_replace": 4}, "KAKA", "----"),
], ids=["layer_types", "default-4-layers", "default-6-layers", "linear_attn_config", "mlp_layer_types",
        "first-dense-default", "all-dense"])
def test_layer_placement(change, mixers, ffns):
    """As KimiLinearConfig places them: layer_types, else linear_attn_config's 1-based lists, else attention on
    0-based layers i > 0 with i % 4 == 0; mlp_layer_types, else dense below first_k_dense_replace (default 1)."""
    assert _symbols(_ir({**SMALL, **change})) == (mixers, ffns)


def test_aliases_read_as_transformers_reads_them():
    """The MoE keys under their aliases (KimiLinearConfig's attribute_map) give the same model; both stated, they
    must agree."""
    aliased = {k: v for k, v in SMALL.items() if k not in ("num_experts", "num_experts_per_token", "num_expert_group",
                                                          "num_shared_experts")}
    aliased.update(num_local_experts=6, num_experts_per_tok=2, n_group=2, n_shared_experts=2, norm_topk_prob=True)
    assert _ir(aliased).layers[3].mixer == _ir(SMALL).layers[3].mixer
    with pytest.raises(HFError, match="'num_local_experts' \\(8\\) disagrees with 'num_experts' \\(6\\)"):
        spec_from_config({**SMALL, "num_local_experts": 8})


@pytest.mark.parametrize("change, message", [
    ({"tie_word_embeddings": True}, "'tie_word_embeddings' = True is not supported (supported: false"),
    ({"hidden_act": "gelu"}, "'hidden_act'"),
    ({"layer_types": ["linear_attention"] * 3}, "'layer_types' must list num_hidden_layers = 4"),
    ({"linear_attn_config": {"full_attn_layers": [1, 4], "kda_layers": [2, 3]}},
     "'layer_types' disagrees with 'linear_attn_config.full_attn_layers'"),
    ({"layer_types": None, "linear_attn_config": {"full_attn_layers": [2], "kda_layers": [1, 3]}},
     "must together list each layer number 1 to 4 once"),
    ({"linear_attn_config": {"num_heads": 2, "chunk": 64}}, "'linear_attn_config' keys 'chunk' are not supported"),
    ({"linear_attn_config": [1]}, "'linear_attn_config' must be a JSON object"),
    ({"linear_attn_config": {"num_heads": "2"}}, "'linear_attn_config.num_heads' must be a positive integer"),
    ({"linear_num_heads": 4}, "'linear_attn_config.num_heads' (2) disagrees with 'linear_num_heads' (4)"),
    ({"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "first_k_dense_replace": 2},
     "'mlp_layer_types' disagrees with 'first_k_dense_replace' (2)"),
    ({"mlp_layer_types": ["dense", "moe", "moe", "moe"]}, "'mlp_layer_types' must list"),
    ({"num_key_value_heads": 1}, "'num_key_value_heads' = 1 is not supported"),
    ({"mla_use_nope": False}, "'mla_use_nope' = False is not supported"),
    ({"num_experts_per_token": 7}, "num_experts_per_token 7 > num_experts 6"),
    ({"num_expert_group": 4}, "'num_expert_group' (4) must divide 'num_experts' (6)"),
    ({"topk_group": 3}, "'topk_group' (3) must be at most the groups"),
    ({"moe_router_activation_func": "softmax"}, "'moe_router_activation_func'"),
    ({"use_grouped_topk": False}, "'use_grouped_topk' = False is not supported"),
    ({"num_nextn_predict_layers": 1}, "'num_nextn_predict_layers'"),
    ({"moe_layer_freq": 2}, "'moe_layer_freq'"),
    ({"moe_renormalize": "yes"}, "'moe_renormalize' must be true or false"),
    ({"routed_scaling_factor": 0}, "'routed_scaling_factor' must be a positive finite number"),
    ({"head_dim": 8}, "'head_dim' = 8 is not supported (supported: null or 4"),
    ({"some_new_key": 1}, "unknown config keys that may change the computation: some_new_key"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_hostile_fields_name_the_key(change, message):
    with pytest.raises(HFError) as e:
        spec_from_config({**SMALL, **change})
    assert message in str(e.value)


def test_rope_keys_are_unused():
    """Kimi-Linear's MLA applies no RoPE, so transformers ignores RoPE settings: the model does not change."""
    cfg = {**SMALL, "rope_theta": 50000.0, "rope_scaling": None, "model_max_length": 4096}
    assert _ir(cfg).layers[2].mixer == _ir(SMALL).layers[2].mixer


# ---- against transformers: logits, generation through our cache, the round trip ------------------------------


def _hf(kwargs: dict, seed: int = 0):
    """A float32 transformers Kimi-Linear with non-trivial random weights and selection bias (eager experts)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from hf_tiny import randomize

    cfg = transformers.AutoConfig.for_model("kimi_linear", **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").float().eval()
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(case, published layout?) -> (folder, transformers model); built once per module."""
    root = tmp_path_factory.mktemp("kimi")
    models, cache = {}, {}

    def get(case: str, published: bool = True):
        if case not in models:
            models[case] = _hf({"tiny": TINY, "q_lora": TINY_Q}[case])
        if (case, published) not in cache:
            folder = root / f"{case}{'' if published else '_own'}"
            models[case].save_pretrained(folder, save_original_format=published)
            cache[case, published] = folder, models[case]
        return cache[case, published]

    return get


@pytest.mark.parametrize("case, published", [("tiny", True), ("tiny", False), ("q_lora", True)],
                         ids=["published-layout", "transformers-layout", "q-lora"])
def test_logits_and_greedy_generation_match_transformers(case, published, saved):
    """fp32 logits within 1e-4 relative; 10 greedy tokens through our cache (conv taps, KDA states, MLA latents)
    equal transformers' uncached decoding."""
    torch = pytest.importorskip("torch")
    from hf_tiny import greedy_no_cache

    folder, hf = saved(case, published)
    ours = ltmdsl.from_hf(folder)
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert_close(got, want, 1e-4, f"Kimi-Linear {case} logits")
    assert ours.generate(ids[:1], 10).tolist() == greedy_no_cache(hf, ids[:1], 10).tolist()


def test_the_selection_bias_is_loaded(saved):
    """The router's e_score_correction_bias (a buffer in both models) reaches our MoE's selection bias."""
    torch = pytest.importorskip("torch")
    folder, hf = saved("tiny")
    ours = dict(ltmdsl.from_hf(folder).named_buffers())
    want = dict(hf.named_buffers())["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(ours["layers.3.mixer.selection_bias"], want)


@pytest.mark.parametrize("published", [True, False], ids=["published-layout", "transformers-layout"])
def test_round_trip_is_exact(published, saved, tmp_path):
    """HF -> ltmdsl -> HF: the same tensors bit for bit in the same layout (--fused-experts for transformers'
    own), and transformers loads the export to the same logits."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from hf_tiny import load_hf
    from ltmdsl.hf.export import export_hf

    folder, hf = saved("tiny", published)
    export_hf(ltmdsl.from_hf(folder), tmp_path / "out", fused=not published)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["KimiLinearForCausalLM"]
    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(load_hf(tmp_path / "out")(ids).logits, hf(ids).logits, 1e-5, "exported Kimi-Linear logits")


def test_example_exports_to_kimi_linear():
    """The example's config is KimiLinearConfig's sizes, and it imports back to the example."""
    from ltmdsl.hf.export import config_from_ir

    example = ltmdsl.load(EXAMPLES / "kimi-linear-48b-a3b.ltm").model
    cfg = config_from_ir(example)
    assert cfg["model_type"] == "kimi_linear" and cfg["num_experts"] == 256 and "rope_theta" not in cfg
    ir = _ir(cfg)
    assert [(x.norm, x.mixer) for x in ir.layers] == [(x.norm, x.mixer) for x in example.layers]


@pytest.mark.parametrize("edit, message", [
    (("head = untied", "head = tied"), "never ties its head"),
    (("rope_theta = none", "rope_theta = 10000.0"), "Kimi-Linear's MLA applies no RoPE"),
    (("routing = sigmoid_topk_renorm", "routing = softmax_topk_renorm"),
     "Kimi-Linear's MoE is DeepSeek-V3's: DeepSeek-V3 routes with sigmoid scores"),
], ids=["tied", "rope", "softmax"])
def test_export_refuses_what_kimi_linear_cannot_hold(edit, message):
    from ltmdsl.hf.export import hf_plan

    text = (EXAMPLES / "kimi-linear-48b-a3b.ltm").read_text()
    assert edit[0] in text
    with pytest.raises(HFError, match=message):
        hf_plan(ltmdsl.loads(text.replace(edit[0], edit[1])).model)


def test_transformers_cached_generate_agrees(saved):
    """transformers' own generate, through its cache of conv taps, KDA states and MLA latents, equals ours."""
    torch = pytest.importorskip("torch")
    folder, hf = saved("tiny")
    ids = torch.randint(3, 61, (1, 9), generator=torch.Generator().manual_seed(6))
    want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ltmdsl.from_hf(folder).generate(ids, 12).tolist() == want.tolist()
