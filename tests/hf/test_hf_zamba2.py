"""Zamba2 (transformers' Zamba2ForCausalLM): the example's parameter count against transformers on the meta
device for the published config (tests/hf/configs/Zamba2-2.7B.json, written from Zyphra/Zamba2-2.7B's published
values and Zamba2Config's defaults: there is no network)."""

from __future__ import annotations

import json

import pytest

import ltmdsl
from paths import EXAMPLES

CONFIGS = EXAMPLES.parent / "tests" / "hf" / "configs"


def test_example_counts_what_transformers_counts_on_the_meta_device():
    """examples/zamba2-2.7b.ltm: two shared blocks counted once each, every use's adapters and linear once per
    use, the tied head not at all: 2,662,214,560 as transformers counts the published config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((CONFIGS / "Zamba2-2.7B.json").read_text())
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    want = sum(p.numel() for p in model.parameters())
    ir = ltmdsl.load(EXAMPLES / "zamba2-2.7b.ltm").model
    assert ir.params_total == want == 2_662_214_560
    hybrid = [i for i, t in enumerate(config.layers_block_type) if t == "hybrid"]
    assert sum(layer.kind == "transformer_block" for layer in ir.layers) == len(hybrid)
    assert sum(layer.kind == "mamba2" for layer in ir.layers) == config.num_hidden_layers


def test_example_stack_is_the_published_layer_list():
    """Each Zamba2 layer is one Mamba-2 sub-layer, preceded for a hybrid one by a transformer_block whose shared
    block is use % num_mem_blocks (block z0, z1, z0, ...), as transformers ties them."""
    cfg = json.loads((CONFIGS / "Zamba2-2.7B.json").read_text())
    ir = ltmdsl.load(EXAMPLES / "zamba2-2.7b.ltm").model
    types, groups, before = [], [], None
    for layer in ir.layers:
        if layer.kind == "transformer_block":
            before = layer
            continue
        types.append("mamba" if before is None else "hybrid")
        if before is not None:
            groups.append(before.tie_group)
            assert before.residual.input == "concat_embed" and before.residual.into == "next_input"
        before = None
    assert types == cfg["layers_block_type"]
    assert groups == [f"z{u % cfg['num_mem_blocks']}" for u in range(len(groups))]


# ---- tiny random checkpoints: logits, greedy generation, round trip -----------------------------------------

#: "adapters": two shared blocks used in turn over three hybrid layers (block 0 twice), q/k/v and MLP adapters,
#: RoPE (theta 500) over the whole head of 2 * 36 / 6 = 12, Mamba-2 with 2 groups, chunks of 8 (shorter than the
#: prompt) and dt clamped at time_step_min; "gqa": one shared block used twice, GQA 3:1 without q/k/v adapters and
#: without RoPE, gelu_pytorch_tanh, the default intermediate_size (4d), a hybrid first layer; "untied": untied
#: embeddings, with which transformers ties no shared block (each hybrid layer owns its block; num_mem_blocks 2
#: over 2 uses, so that no block holds an adapter it never runs).
TINY = dict(vocab_size=61, hidden_size=36, num_hidden_layers=6,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"], mamba_d_state=6,
            mamba_d_conv=3, n_mamba_heads=6, mamba_ngroups=2, chunk_size=8, num_attention_heads=6,
            num_key_value_heads=6, intermediate_size=50, num_mem_blocks=2, use_shared_attention_adapter=True,
            adapter_rank=5, use_mem_rope=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
CASES = {
    "adapters": TINY,
    "gqa": {**TINY, "num_key_value_heads": 2, "use_shared_attention_adapter": False, "use_mem_rope": False,
            "num_mem_blocks": 1, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": None,
            "layers_block_type": ["hybrid", "mamba", "hybrid", "mamba"], "num_hidden_layers": 4},
    "untied": {**TINY, "tie_word_embeddings": False, "layers_block_type": ["mamba", "hybrid", "hybrid", "mamba"],
               "num_hidden_layers": 4},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_generation_and_round_trip_match_transformers(case, tmp_path):
    """fp32 logits within 1e-4 of Zamba2ForCausalLM's, greedy tokens through our cache equal to transformers'
    (without a cache and its own cached generate), the parameter count equal, and HF -> ltmdsl -> HF the same
    tensors bit for bit (the tied later uses not written, as transformers saves them) with the same logits."""
    pytest.importorskip("transformers")
    from hf_parity import check_parity, check_round_trip, tiny

    hf = tiny("zamba2", CASES[case])
    ours = check_parity(hf, tmp_path / "src", f"zamba2 {case}")
    assert ours.num_parameters() == ours.ir.params_total == sum(p.numel() for p in hf.parameters())
    check_round_trip(tmp_path / "src", tmp_path / "out", f"zamba2 {case}")


def test_untied_blocks_skip_the_adapters_they_never_run(tmp_path):
    """Untied (tie_word_embeddings false) with one block id for three uses, transformers builds in every hybrid
    layer the adapters of all three uses and runs its own: the logits match, and our count is transformers' less
    the adapters that never run."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_parity import check_parity, tiny

    cfg = {**TINY, "tie_word_embeddings": False, "num_mem_blocks": 1}
    hf = tiny("zamba2", cfg)
    ours = check_parity(hf, tmp_path, "zamba2 untied, one block id")
    hybrid = [j for j, t in enumerate(cfg["layers_block_type"]) if t == "hybrid"]
    dead = sum(p.numel() for n, p in hf.named_parameters() if "adapter_list." in n
               and int(n.split("adapter_list.")[1].split(".")[0]) != hybrid.index(int(n.split(".")[2])))
    assert dead > 0
    assert ours.ir.params_total == sum(p.numel() for p in hf.parameters()) - dead
    assert any("never run" in line for line in ours.ir.source_text.splitlines())


def test_checkpoints_holding_the_tied_copies_load(tmp_path):
    """A checkpoint that also stores the later uses' copies of a shared block (tied to its first use by
    transformers) loads: the copies are allowed, the first use's tensors are read."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from hf_parity import tiny

    hf = tiny("zamba2", TINY)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    owner = "model.layers.1.shared_transformer."  # block 0's first use; layer 4 is its second use
    tensors.update({k.replace("layers.1.", "layers.4."): v.clone() for k, v in tensors.items() if k.startswith(owner)})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = ltmdsl.from_hf(tmp_path)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        from helpers import assert_close

        assert_close(ours(ids), hf(ids).logits, 1e-4, "zamba2 with tied copies")


# ---- configs: the published one, and every bad field an error naming its key ---------------------------------


def test_published_config_imports_as_the_example():
    from ltmdsl.hf.configs import spec_from_config

    cfg = json.loads((CONFIGS / "Zamba2-2.7B.json").read_text())
    imported = ltmdsl.loads(spec_from_config(cfg)).model
    example = ltmdsl.load(EXAMPLES / "zamba2-2.7b.ltm").model
    assert imported.params_total == example.params_total == 2_662_214_560
    assert [(x.kind, x.mixer, x.residual, x.tie_group) for x in imported.layers] == \
        [(x.kind, x.mixer, x.residual, x.tie_group) for x in example.layers]


BAD = {
    "rms_norm_eps": 1e-6,  # the Mamba-2 gated norm's epsilon is 1e-5 in transformers whatever this says
    "add_bias_linear": True,
    "use_shared_mlp_adapter": False,
    "hidden_act": "relu",
    "kv_channels": 7,
    "attention_head_dim": 10,
    "mamba_headdim": 5,
    "hybrid_layer_ids": [0],
    "num_mem_blocks": 25,
    "layers_block_type": ["mamba", "attention", "mamba", "hybrid", "hybrid", "mamba"],
    "surprise_key": 1,
}


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_fields_are_refused_by_name(key):
    from ltmdsl.hf import HFError
    from ltmdsl.hf.configs import spec_from_config

    with pytest.raises(HFError, match=key):
        spec_from_config({"model_type": "zamba2", **TINY, key: BAD[key]})


def test_gqa_with_qkv_adapters_is_refused_by_name():
    """transformers' k and v adapters write 2 * hidden_size rows: with fewer KV heads it cannot build the model."""
    from ltmdsl.hf import HFError
    from ltmdsl.hf.configs import spec_from_config

    with pytest.raises(HFError, match="use_shared_attention_adapter"):
        spec_from_config({"model_type": "zamba2", **TINY, "num_key_value_heads": 2})


def test_export_refuses_blocks_used_out_of_turn():
    """Zamba2 runs use u in block u % num_mem_blocks: a stack using its blocks in another order has no config."""
    from ltmdsl.hf import HFError
    from ltmdsl.hf.export import config_from_ir

    text = (EXAMPLES / "zamba2-2.7b.ltm").read_text().replace("repeat 3 { g0 g1 }", "repeat 3 { g1 g0 }")
    with pytest.raises(HFError, match="in turn"):
        config_from_ir(ltmdsl.loads(text).model)


def test_export_of_the_example_config_is_the_published_one():
    """export's config of examples/zamba2-2.7b.ltm imports back to the same model (hf_plan checks it), with the
    published layer list and shared-block settings."""
    from ltmdsl.hf.export import hf_plan

    cfg, _ = hf_plan(ltmdsl.load(EXAMPLES / "zamba2-2.7b.ltm").model)
    published = json.loads((CONFIGS / "Zamba2-2.7B.json").read_text())
    for key in ("layers_block_type", "num_mem_blocks", "adapter_rank", "use_shared_attention_adapter", "use_mem_rope",
                "n_mamba_heads", "mamba_d_state", "intermediate_size", "num_attention_heads", "time_step_min"):
        assert cfg[key] == published[key], key
