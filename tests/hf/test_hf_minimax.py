"""MiniMax (model_type minimax) import: the published config is the example (count checked on the meta device), the
layer pattern from layer_types / attn_type_list, the residual factors as per-sub-layer residual settings (checked
against transformers' MiniMaxDecoderLayer in float64), the memory report, transformers' own cached generate, and
hostile config fields named in the error. Logits (fp32 <= 1e-4), greedy generation through our cache and the
round trip run with the other families' tiny checkpoints (hf_tiny.CASES "minimax", "minimax_fused")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_close, rel_err
from paths import EXAMPLES

import ltmdsl
from ltmdsl.cli import main
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config
from ltmdsl.ir import Residual

CONFIG = Path(__file__).parent / "configs" / "MiniMax-Text-01-hf.json"
ALPHA = (2 * 80) ** 0.25  # MiniMax-Text-01's alpha factors
#: a small config stating what the tests vary
SMALL = {"model_type": "minimax", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
         "num_experts_per_tok": 2, "block_size": 16}
HF_TOL = 1e-6  # float64 modules; MiniMaxRMSNorm normalises in fp32 even there


def _ir(cfg: dict, **kw):
    return ltmdsl.loads(spec_from_config(cfg, **kw)).model


def test_published_config_is_the_example():
    """The example is `ltmdsl import-hf --ignore rotary_dim` of the committed config: 70 lightning and 10 softmax
    layers (every 8th), each followed by the MoE; every residual taken after the norm and scaled by (2 L)^(1/4)."""
    cfg = json.loads(CONFIG.read_text())
    ir = _ir(cfg, name="minimax_text_01", ignore=["rotary_dim"])
    example = ltmdsl.load(EXAMPLES / "minimax-text-01.ltm").model
    assert [(x.mixer, x.norm, x.residual) for x in ir.layers] == \
           [(x.mixer, x.norm, x.residual) for x in example.layers]
    assert ir.params_total == example.params_total == 456_089_655_296
    assert [x.kind for x in example.layers[0::2]] == (["lightning"] * 7 + ["attention"]) * 10
    assert {x.kind for x in example.layers[1::2]} == {"moe"}
    assert {x.residual for x in example.layers} == {Residual("normed", ALPHA, 1.0)}
    assert "NOTE: 'rotary_dim' ignored on request" in EXAMPLES.joinpath("minimax-text-01.ltm").read_text()


def test_published_count_is_what_transformers_counts_on_meta():
    from test_hf_configs import transformers_count

    cfg = json.loads(CONFIG.read_text())
    assert transformers_count(cfg) == 456_089_655_296


def test_rotary_dim_is_refused_by_name():
    """transformers' MiniMaxAttention rotates the whole head whatever rotary_dim says: importing the published
    config as it is would silently differ from either the original model or transformers."""
    with pytest.raises(HFError, match="'rotary_dim' = 64 is not supported .*ignores rotary_dim"):
        spec_from_config(json.loads(CONFIG.read_text()))
    assert _ir({**SMALL, "rotary_dim": 8}).layers[0].mixer.rope_dim is None  # the whole head (8) is fine


def test_memory_report_at_1m_shows_lightning_state_beside_kv_cache(capsys):
    """`ltmdsl memory --context 1M`: the 10 softmax layers' KV cache grows with T, the 70 lightning layers keep
    64 * 128 * 128 fp32 values each (per sequence), constant in T."""
    assert main(["memory", str(EXAMPLES / "minimax-text-01.ltm"), "--context", "1M", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["by_kind"]["kv_cache"] == {"attention": 10 * 2 * 8 * 128 * 10**6}  # fp8 keys and values
    assert report["by_kind"]["recurrent_state"] == {"lightning": 70 * 64 * 128 * 128 * 4}
    assert report["growth"]["kv_cache"] == "O(T)" and report["growth"]["recurrent_state"] == "O(1)"


@pytest.mark.parametrize("change, mixers", [
    ({}, "ALAL"),
    ({"layer_types": ["linear_attention"] * 3 + ["full_attention"]}, "LLLA"),
    ({"layer_types": ["linear_attention"] * 3 + ["full_attention"], "attn_type_list": [0, 0, 0, 1]}, "LLLA"),
], ids=["default-alternation", "layer_types", "attn_type_list-agrees"])
def test_layer_pattern(change, mixers):
    """MiniMaxConfig's default puts full attention on the even 0-based layers; layer_types overrides it."""
    kinds = [x.kind for x in _ir({**SMALL, **change}).layers]
    assert "".join({"lightning": "L", "attention": "A"}[k] for k in kinds[0::2]) == mixers
    assert set(kinds[1::2]) == {"moe"}


def test_small_configs_count_what_transformers_counts():
    from test_hf_configs import transformers_count

    for change in ({}, {"layer_types": ["linear_attention"] * 4}, {"head_dim": 12, "num_key_value_heads": 1}):
        cfg = {**SMALL, **change}
        assert _ir(cfg).params_total == transformers_count(cfg)


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ["linear_attention"] * 3}, "'layer_types' must list num_hidden_layers = 4"),
    ({"layer_types": ["linear_attention"] * 3 + ["sliding_attention"]}, "'layer_types' must list"),
    ({"attn_type_list": [0, 1, 0, 1]}, "'attn_type_list' without 'layer_types'"),
    ({"layer_types": ["linear_attention"] * 4, "attn_type_list": [0, 0, 0, 1]}, "'attn_type_list' .* disagrees"),
    ({"mlp_alpha_factor": -1.0}, "'mlp_alpha_factor' must be a positive finite number"),
    ({"full_attn_beta_factor": "1"}, "'full_attn_beta_factor' must be a positive"),
    ({"linear_attn_alpha_factor": 2.0, "layernorm_linear_attention_alpha": 3.0},
     "'layernorm_linear_attention_alpha' = 3.0 disagrees with 'linear_attn_alpha_factor'"),
    ({"postnorm": False}, "'postnorm' = False is not supported"),
    ({"shared_intermediate_size": 64}, "'shared_intermediate_size' = 64 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 > num_local_experts 4"),
    ({"block_size": 0}, "'block_size' must be an integer"),
    ({"num_attention_heads": 5}, "hidden_size 32 is not a multiple of num_attention_heads 5"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ({"some_new_key": 1}, "some_new_key"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_hostile_fields_name_the_key(change, message):
    with pytest.raises(HFError, match=message):
        spec_from_config({**SMALL, **change})


def _tiny(tmp_path, case="minimax", dtype=None):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_tiny import save_case

    hf = save_case(case, tmp_path / case)
    return hf, ltmdsl.from_hf(tmp_path / case, dtype=dtype or torch.float32)


def test_decoder_layers_match_transformers_in_float64(tmp_path):
    """transformers' MiniMaxDecoderLayer (residual after each norm, scaled by alpha, branch by beta) against our two
    sub-layers with the same weights, for a lightning layer and a softmax layer, in float64."""
    torch = pytest.importorskip("torch")
    hf, ours = _tiny(tmp_path, dtype=torch.float64)
    hf = hf.double()
    x = torch.randn(2, 11, 36, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # [B, T, d]
    pos = torch.arange(11)[None]
    cos_sin = hf.model.rotary_emb(x, pos)
    mask = torch.full((11, 11), float("-inf"), dtype=torch.float64).triu(1)[None, None]  # [1, 1, T, T] causal
    for i, kind in ((0, "lightning"), (1, "attention")):
        assert ours.ir.layers[2 * i].kind == kind
        with torch.no_grad():
            ref = hf.model.layers[i](x, position_embeddings=cos_sin, attention_mask=mask if i else None,
                                     position_ids=pos)  # lightning takes a padding mask [B, T] or none
            h, pending = ours.layers[2 * i].advance(x, None, None, 0, False, 1.0)
            h, pending = ours.layers[2 * i + 1].advance(h, pending, None, 0, False, 1.0)
        print(f"decoder layer {i} ({kind}): {rel_err(h + pending, ref):.2e}")
        assert_close(h + pending, ref, HF_TOL, f"decoder layer {i} ({kind})")


def test_transformers_cached_generate_agrees(tmp_path):
    """transformers' own generate (its MiniMaxCache: KV cache and lightning states) equals ours."""
    torch = pytest.importorskip("torch")
    hf, ours = _tiny(tmp_path)
    ids = torch.randint(0, 61, (1, 13), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    assert ours.generate(ids, 12).tolist() == want.tolist()


def test_checkpoint_buffers_must_be_the_computed_ones(tmp_path):
    """transformers saves each lightning layer's slopes and decay tables; a checkpoint whose slopes are not the
    ones its config and depth give is refused, naming the tensor."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    _tiny(tmp_path)
    path = tmp_path / "minimax" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.2.self_attn.slope_rate"] = tensors["model.layers.0.self_attn.slope_rate"].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(HFError, match="tensor model.layers.2.self_attn.slope_rate .* is not what this config"):
        ltmdsl.from_hf(tmp_path / "minimax", dtype=torch.float32)


SPEC = """model m {{
    vocab = 64
    d_model = 32
    layer lin = lightning(heads = 4, chunk = 16{lin})
    layer attn = attention(heads = 4, kv_heads = 2, rope_theta = 10000, skip = normed)
    layer moe = moe(experts = 4, top_k = 2, d_ff = 24, routing = softmax_topk_renorm{moe})
    stack {{ lin moe attn moe lin moe }}
}}
"""


@pytest.mark.parametrize("lin, moe, message", [
    (", skip = normed", "", "MiniMax takes every residual after the norm"),
    (", skip = normed, skip_scale = 2", ", skip = normed", "the layers differ in the residual scales of their "
                                                          "lightning layers"),
    (", skip = normed, act = gelu", ", skip = normed", "MiniMax's lightning layers apply silu"),
], ids=["skip-input", "scales-differ", "gelu"])
def test_export_refuses_what_minimax_cannot_hold(lin, moe, message):
    from ltmdsl.hf.export import config_from_ir

    text = SPEC.format(lin=lin, moe=moe)
    if "differ" in message:  # the second lightning layer keeps the plain scale
        text = text.replace("stack { lin moe attn moe lin moe }", "stack { lin moe attn moe lin2 moe }").replace(
            "    layer attn", "    layer lin2 = lightning(heads = 4, chunk = 16, skip = normed)\n    layer attn")
    ir = ltmdsl.loads(text).model
    with pytest.raises(HFError, match=message):
        config_from_ir(ir)


def test_scaled_residuals_outside_minimax_are_refused():
    """A Llama-shaped stack with a scaled residual has no Hugging Face counterpart: the round trip check names it."""
    from ltmdsl.hf.export import hf_plan

    ir = ltmdsl.loads("model m {\n vocab = 64\n d_model = 32\n layer a = attention(heads = 4, skip_scale = 2)\n"
                      " layer f = mlp(d_ff = 24)\n stack { a f a f }\n}\n").model
    with pytest.raises(HFError, match="does not map back to llama exactly: sub-layer 0: residual .*skip_scale=2.0"):
        hf_plan(ir)
