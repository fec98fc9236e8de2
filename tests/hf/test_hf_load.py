"""from_hf against transformers: logits, greedy generation through the cache, both expert layouts, shards,
and the errors a broken checkpoint must produce (HFError naming the tensor)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import ltmdsl  # noqa: E402
from helpers import assert_close, rel_err  # noqa: E402
from hf_tiny import CASES, greedy_no_cache, save_case  # noqa: E402

from ltmdsl.hf import HFError  # noqa: E402

PROMPT = 13  # longer than every window of the tiny cases, odd


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (folder, in-memory transformers model); built lazily, once per module."""
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(case):
        if case not in cache:
            folder = root / case
            cache[case] = (folder, save_case(case, folder))
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_generation_match_transformers(case, saved):
    folder, hf = saved(case)
    ours = ltmdsl.from_hf(folder, dtype=torch.float32)
    ids = torch.randint(0, 61, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    print(f"{case}: logits relative error {rel_err(got, ref):.2e}")
    assert_close(got, ref, 1e-4, f"{case} logits")
    want = greedy_no_cache(hf, ids[:1], 20)
    assert ours.generate(ids[:1], 20).tolist() == want.tolist()  # ours decodes through its cache


def test_transformers_generate_agrees_where_its_cache_is_reliable(saved):
    """transformers' own cached generate equals ours for a plain, a recurrent and hybrid families (Bamba: KV
    cache with partial RoPE and Mamba-2 states; Qwen3-Next: KV cache, conv taps and delta-rule states). (For Qwen2 with
    both sliding and full layers, transformers 5.24's cached generate disagrees with its own uncached
    forward, so the tests above use the uncached loop as the reference.)"""
    for case in ("llama", "mamba2", "bamba", "qwen3_next"):
        folder, hf = saved(case)
        ours = ltmdsl.from_hf(folder)
        ids = torch.randint(0, 61, (1, PROMPT), generator=torch.Generator().manual_seed(2))
        want = hf.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        assert ours.generate(ids, 20).tolist() == want.tolist(), case


def test_fused_checkpoint_is_what_transformers_writes(saved):
    from safetensors import safe_open

    folder, _ = saved("mixtral_fused")
    names = set(safe_open(str(folder / "model.safetensors"), "pt").keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    folder, _ = saved("mixtral")
    names = set(safe_open(str(folder / "model.safetensors"), "pt").keys())
    assert "model.layers.0.block_sparse_moe.experts.4.w2.weight" in names


def test_sharded_checkpoint(saved, tmp_path):
    _, hf = saved("jamba")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = ltmdsl.from_hf(tmp_path / "config.json")
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, 1e-4, "sharded jamba logits")


def test_llama3_rope_scaling_matches_transformers_past_original_context(saved, tmp_path):
    """Llama 3.1's rope scaling (toy: original context 16, factor 4): logits over 40 tokens (in fp32, 1e-4)
    and greedy decoding through our cache out to position 48 equal transformers; the same weights with plain
    RoPE differ by far more than the tolerance, so the scaling is really applied."""
    folder, hf = saved("llama3_rope")
    ours = ltmdsl.from_hf(folder, dtype=torch.float32)
    assert "rope_scaling = llama3(factor = 4.0, low_freq_factor = 0.5, high_freq_factor = 2.0, original_context = 16)" \
        in ours.ir.source_text
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    print(f"llama3_rope, 40 tokens: logits relative error {rel_err(got, ref):.2e}")
    assert_close(got, ref, 1e-4, "llama3-scaled logits")
    assert ours.generate(ids[:1], 8).tolist() == greedy_no_cache(hf, ids[:1], 8).tolist()
    shutil.copytree(folder, tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        assert rel_err(ltmdsl.from_hf(tmp_path / "plain", dtype=torch.float32)(ids), ref) > 1e-2


def test_bamba_partial_rope_matters_and_decodes_past_the_original_context(saved, tmp_path):
    """Bamba with rope_dim 4 of head_dim 16 and Llama 3.1's scaling (original context 16): logits over 40 tokens
    (fp32, 1e-4) and greedy decoding through our cache to position 48 equal transformers; the same checkpoint
    read as rotating the whole head (partial_rotary_factor 1.0) differs by far more than the tolerance."""
    folder, hf = saved("bamba_rope")
    ours = ltmdsl.from_hf(folder, dtype=torch.float32)
    assert "rope_dim = 4" in ours.ir.source_text and "rope_scaling = llama3(" in ours.ir.source_text
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    print(f"bamba_rope, 40 tokens: logits relative error {rel_err(got, ref):.2e}")
    assert_close(got, ref, 1e-4, "bamba partial-rope logits")
    assert ours.generate(ids[:1], 8).tolist() == greedy_no_cache(hf, ids[:1], 8).tolist()
    shutil.copytree(folder, tmp_path / "whole")
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())
    cfg["rope_parameters"]["partial_rotary_factor"] = 1.0
    (tmp_path / "whole" / "config.json").write_text(json.dumps(cfg))
    whole = ltmdsl.from_hf(tmp_path / "whole", dtype=torch.float32)
    assert {a.mixer.rope_dim for a in whole.ir.layers if a.kind == "attention"} == {None}
    with torch.no_grad():
        assert rel_err(whole(ids), ref) > 1e-2


def _copy_with(src, dst, edit):
    """Copy a saved folder, rewriting its safetensors file through `edit(dict) -> dict`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"))


def test_missing_tensor_is_named(saved, tmp_path):
    folder, _ = saved("mixtral")
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    _copy_with(folder, tmp_path / "c", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(HFError, match=f"missing tensor {name}"):
        ltmdsl.from_hf(tmp_path / "c")


def test_unexpected_tensor_is_named(saved, tmp_path):
    folder, _ = saved("llama")
    _copy_with(folder, tmp_path / "c", lambda t: {**t, "model.layers.0.self_attn.rotary.inv_freq": torch.ones(3)})
    with pytest.raises(HFError, match="unexpected tensor model.layers.0.self_attn.rotary.inv_freq"):
        ltmdsl.from_hf(tmp_path / "c")


def test_shape_mismatch_is_named(saved, tmp_path):
    folder, _ = saved("mamba")
    shutil.copytree(folder, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["state_size"] = 7
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError, match=r"backbone\.layers\.0\.mixer\.A_log has shape \[72, 6\], expected \[72, 7\]"):
        ltmdsl.from_hf(tmp_path / "c")


def test_fused_expert_shape_mismatch_is_named(saved, tmp_path):
    folder, _ = saved("mixtral_fused")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    _copy_with(folder, tmp_path / "c", lambda t: {**t, name: t[name][:, :-2].contiguous()})
    with pytest.raises(HFError, match=f"tensor {name} has shape"):
        ltmdsl.from_hf(tmp_path / "c")


def test_bad_or_absent_weights(saved, tmp_path):
    folder, _ = saved("llama")
    (tmp_path / "none").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "none" / "config.json")
    with pytest.raises(HFError, match="no model.safetensors"):
        ltmdsl.from_hf(tmp_path / "none")
    shutil.copytree(tmp_path / "none", tmp_path / "idx")
    (tmp_path / "idx" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "../evil.safetensors"}}))
    with pytest.raises(HFError, match="not a .safetensors file in the folder"):
        ltmdsl.from_hf(tmp_path / "idx")
    shutil.copytree(tmp_path / "none", tmp_path / "junk")
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(HFError, match="cannot open safetensors"):
        ltmdsl.from_hf(tmp_path / "junk")
    assert not os.path.exists(tmp_path / "evil.safetensors")


# ---- nothing is allocated before the headers are checked ----------------------------------------------

def test_a_huge_config_with_a_tiny_file_allocates_nothing(saved, tmp_path):
    import resource

    folder, _ = saved("llama")
    (tmp_path / "h").mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
               num_key_value_heads=8, head_dim=128, vocab_size=128256)
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    shutil.copy(folder / "model.safetensors", tmp_path / "h" / "model.safetensors")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(HFError, match="has shape|missing tensor|unexpected tensor"):
        ltmdsl.from_hf(tmp_path / "h")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB, for a 1.6 TB model


def test_from_hf_refuses_what_memory_cannot_hold(saved, tmp_path, monkeypatch):
    from ltmdsl import tensorfile

    folder, _ = saved("llama")
    monkeypatch.setattr(tensorfile, "available_bytes", lambda: 4096)
    with pytest.raises(HFError, match="GiB of memory available"):
        ltmdsl.from_hf(folder)


def test_integer_weights_are_refused(saved, tmp_path):
    folder, _ = saved("llama")
    name = "model.norm.weight"
    _copy_with(folder, tmp_path / "c", lambda t: {**t, name: t[name].to(torch.int32)})
    with pytest.raises(HFError, match=f"tensor {name} is I32"):
        ltmdsl.from_hf(tmp_path / "c")


def test_nan_weights_warn(saved, tmp_path):
    folder, _ = saved("llama")
    name = "model.norm.weight"

    def poison(t):
        t[name][0] = float("nan")
        return t

    _copy_with(folder, tmp_path / "c", poison)
    with pytest.warns(RuntimeWarning, match=f"NaN or inf in 1 tensor: {name}"):
        ltmdsl.from_hf(tmp_path / "c")
