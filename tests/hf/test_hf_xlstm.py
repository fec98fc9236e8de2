"""xLSTM (model_type xlstm): xLSTMConfig's defaults (xLSTM-7B's dimensions, tests/hf/configs/xLSTM-7b.json)
import to examples/xlstm-7b.ltm, the widths round as xLSTMConfig / xLSTMFeedForward round them, and every bad
or unexpressible field is an error naming its key.

A tiny random transformers xLSTM (float32 native kernels) loads through from_hf with logits within 1e-4
relative of transformers' and the same greedy tokens through our cache as transformers' uncached decoding.
export-hf writes it back tensor for tensor, and the 7B example's config is xLSTMConfig's dimensions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import EXAMPLES

import ltmdsl
from helpers import assert_close
from ltmdsl.hf import HFError
from ltmdsl.hf.configs import spec_from_config

CONFIGS = Path(__file__).parent / "configs"
TINY = {"model_type": "xlstm", "vocab_size": 61, "hidden_size": 48, "num_hidden_layers": 3, "num_heads": 4,
        "qk_dim_factor": 0.5, "v_dim_factor": 1.0}


#: A tiny xLSTM: 2 heads of q/k 32 and value 64 channels, chunks of 8 (prompts span several), gate and logit
#: soft caps that random pre-activations reach, an MLP of 1.3 * 128 rounded up to 176.
HF_TINY = {"vocab_size": 61, "hidden_size": 128, "num_hidden_layers": 2, "num_heads": 2, "chunk_size": 8,
           "output_logit_soft_cap": 3.0, "gate_soft_cap": 5.0, "ffn_proj_factor": 1.3,
           "ffn_round_up_to_multiple_of": 16, "autocast_kernel_dtype": "float32", "mode": "inference"}


def _imported(cfg: dict):
    return ltmdsl.loads(spec_from_config(cfg)).model


def test_xlstm_7b_config_is_the_example():
    """xLSTMConfig's defaults resolve to exactly the example's sub-layers, norms and logit cap:
    6,865,424,896 parameters."""
    cfg = json.loads((CONFIGS / "xLSTM-7b.json").read_text())
    text = spec_from_config(cfg)
    assert "# NOTE" not in text
    ir, hand = _imported(cfg), ltmdsl.load(EXAMPLES / "xlstm-7b.ltm").model
    assert [(x.norm, x.mixer, x.post_norm) for x in ir.layers] == [(x.norm, x.mixer, x.post_norm) for x in hand.layers]
    for what in ("vocab", "d_model", "dtype", "tie_embeddings", "final_norm", "embed_scale", "logit_cap"):
        assert getattr(ir, what) == getattr(hand, what), what
    assert ir.logit_cap == 30.0
    assert ir.params_total == hand.params_total == 6_865_424_896


TINY = {**TINY, "hidden_size": 128, "num_heads": 2}


@pytest.mark.parametrize("d, qk_factor, v_factor, ffn_factor, multiple", [
    (128, 0.5, 1.0, 2.667, 64), (128, 1.0, 0.5, 1.3, 32), (256, 0.25, 1.5, 3.0, 1)], ids=["defaults", "narrow", "wide"])
def test_widths_are_transformers_module_widths(d, qk_factor, v_factor, ffn_factor, multiple):
    """The q/k, value and MLP widths are the ones transformers' xLSTMLayer and xLSTMFeedForward build."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.xLSTMConfig(vocab_size=61, hidden_size=d, num_hidden_layers=1, num_heads=2,
                                      qk_dim_factor=qk_factor, v_dim_factor=v_factor, ffn_proj_factor=ffn_factor,
                                      ffn_round_up_to_multiple_of=multiple)
    block = transformers.xLSTMModel(hf_cfg).blocks[0]
    ir = _imported({**TINY, "hidden_size": d, "num_hidden_layers": 1, "qk_dim_factor": qk_factor,
                    "v_dim_factor": v_factor, "ffn_proj_factor": ffn_factor, "ffn_round_up_to_multiple_of": multiple})
    cell, ffn = ir.layers[0].mixer, ir.layers[1].mixer
    assert (cell.qk_dim, cell.v_dim, ffn.d_ff) == (block.mlstm_layer.qk_dim, block.mlstm_layer.v_dim,
                                                    block.ffn.up_proj_dim)
    assert (hf_cfg.qk_dim, hf_cfg.v_dim) == (cell.qk_dim, cell.v_dim)  # the cache's widths agree


def test_uncapped_gates_and_logits():
    """null gate_soft_cap / output_logit_soft_cap: transformers' soft_cap is then the identity."""
    ir = _imported({**TINY, "gate_soft_cap": None, "output_logit_soft_cap": None})
    assert ir.layers[0].mixer.soft_cap is None and ir.logit_cap is None


def test_aliases_agree():
    """embedding_dim / num_blocks stand for hidden_size / num_hidden_layers; both given, they must agree."""
    base = {k: v for k, v in TINY.items() if k not in ("hidden_size", "num_hidden_layers")}
    ir = _imported({**base, "embedding_dim": 128, "num_blocks": 2})
    assert (ir.d_model, len(ir.layers)) == (128, 4)
    with pytest.raises(HFError, match="'num_blocks' 5 disagrees with 'num_hidden_layers' 3"):
        spec_from_config({**TINY, "num_blocks": 5})


@pytest.mark.parametrize("key, value, message", [
    ("use_bias", True, "'use_bias' = True is not supported"),
    ("add_out_norm", False, "'add_out_norm' = False is not supported"),
    ("weight_mode", "packed", "'weight_mode'"),
    ("chunkwise_kernel", "triton", "'chunkwise_kernel'"),
    ("mode", 3, "'mode'"),
    ("qk_dim_factor", 0.3, "'qk_dim_factor' = 0.3 makes transformers' xLSTMLayer 38 wide but its cache 64"),
    ("v_dim_factor", -1, "'v_dim_factor' must be a positive finite number"),
    ("num_heads", 3, "from 'qk_dim_factor' is not a multiple of 'num_heads' 3"),
    ("num_heads", 0, "'num_heads'"),
    ("gate_soft_cap", "15", "'gate_soft_cap'"),
    ("output_logit_soft_cap", float("inf"), "'output_logit_soft_cap'"),
    ("ffn_proj_factor", True, "'ffn_proj_factor'"),
    ("ffn_round_up_to_multiple_of", 0, "'ffn_round_up_to_multiple_of'"),
    ("chunk_size", 0, "'chunk_size'"),
    ("eps", 1.5, "'eps' must be a norm epsilon"),
    ("norm_eps", 0, "'norm_eps'"),
    ("layer_types", ["mlstm"] * 2, "'layer_types' must list 'mlstm' for each of the 3 layers"),
    ("layer_types", ["attention"] * 3, "'layer_types'"),
    ("norm_reduction_force_float32", "yes", "'norm_reduction_force_float32'"),
    ("slstm_at", [1], "unknown config keys that may change the computation: slstm_at"),
], ids=lambda x: str(x)[:24])
def test_bad_fields_name_the_key(key, value, message):
    with pytest.raises(HFError) as e:
        spec_from_config({**TINY, key: value})
    assert message in str(e.value)


def test_layer_types_of_the_right_length():
    assert len(_imported({**TINY, "layer_types": ["mlstm"] * 3}).layers) == 6


def test_logits_and_greedy_generation_match_transformers(tmp_path):
    """from_hf of a saved tiny transformers xLSTM: logits within 1e-4 relative (fp32), and 10 greedy tokens
    through our recurrent state equal transformers' decoding without a cache."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_tiny import greedy_no_cache, hf_model

    hf = hf_model("xlstm", HF_TINY)
    hf.save_pretrained(tmp_path)
    ours = ltmdsl.from_hf(tmp_path)
    ids = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert_close(got, want, 1e-4, "xLSTM logits")
    assert ours.generate(ids[:1], 10).tolist() == greedy_no_cache(hf, ids[:1], 10).tolist()


def test_transformers_cached_generate_agrees(tmp_path):
    """transformers' own generate, through its xLSTMCache, equals ours (12 greedy tokens)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_tiny import hf_model

    hf = hf_model("xlstm", HF_TINY)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(6))
    want = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ltmdsl.from_hf(tmp_path).generate(ids, 12).tolist() == want.tolist()


def test_round_trip_is_exact(tmp_path):
    """HF -> ltmdsl -> HF: the same tensors bit for bit, and transformers loads the export to the same logits."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from hf_tiny import hf_model, load_hf
    from ltmdsl.hf.export import export_hf

    hf = hf_model("xlstm", HF_TINY)
    hf.save_pretrained(tmp_path / "src")
    export_hf(ltmdsl.from_hf(tmp_path / "src"), tmp_path / "out")
    before, after = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(load_hf(tmp_path / "out")(ids).logits, hf(ids).logits, 1e-5, "exported xLSTM logits")


def test_example_exports_to_xlstm_7b_dimensions():
    """export of examples/xlstm-7b.ltm gives a config transformers' xLSTM builds at xLSTM-7B's widths, and it
    imports back to the example."""
    from ltmdsl.hf.export import config_from_ir

    hand = ltmdsl.load(EXAMPLES / "xlstm-7b.ltm").model
    cfg = config_from_ir(hand)
    assert cfg["model_type"] == "xlstm" and cfg["output_logit_soft_cap"] == 30.0
    ir = _imported(cfg)
    assert [(x.norm, x.mixer) for x in ir.layers] == [(x.norm, x.mixer) for x in hand.layers]
    assert ir.params_total == 6_865_424_896


@pytest.mark.parametrize("spec, message", [
    ("mlstm(heads = 2, qk_dim = 48, v_dim = 128)", "multiples of 64"),
    ("mlstm(heads = 2, qk_dim = 64, v_dim = 128, bias = true)", "use_bias"),
    ("mlstm(heads = 2, qk_dim = 64, v_dim = 128, norm_eps = 1e-5)", "one norm_eps"),
    ("mlstm(heads = 2, qk_dim = 64, v_dim = 128) embed_scale = 2", "does not map back to xlstm exactly: embed_scale"),
], ids=["width", "bias", "norm_eps", "embed_scale"])
def test_export_refuses_what_xlstm_cannot_hold(spec, message):
    from ltmdsl.hf.export import hf_plan

    text = (f"model m {{ vocab = 61 d_model = 128 norm = rmsnorm(eps = 1e-6) layer c = {spec} "
            f"layer f = mlp(d_ff = 176, act = swiglu) stack {{ repeat 2 {{ c f }} }} }}")
    with pytest.raises(HFError, match=message):
        hf_plan(ltmdsl.loads(text).model)
