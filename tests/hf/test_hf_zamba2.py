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
