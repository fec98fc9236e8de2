"""Checkpoints: safetensors + spec text round trip exactly, tied weights stored once, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paths import EXAMPLES
from rt_irs import tiny_hybrid_ir

import ltmdsl
from ltmdsl.runtime import checkpoint
from ltmdsl.runtime.build import build

SHARED = """
model shared_ckpt {
    vocab = 32
    d_model = 16
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = tied
    layer a = attention(heads = 2)
    layer f = mlp(d_ff = 32)
    shared block sb { a f }
    stack { sb sb }
}
"""


@pytest.mark.parametrize("spec", [EXAMPLES / "tiny-hybrid.ltm", SHARED], ids=["tiny-hybrid", "shared-block"])
def test_round_trip_is_exact(tmp_path, spec):
    model = build(ltmdsl.load(spec) if isinstance(spec, Path) else ltmdsl.loads(spec), seed=3)
    path = checkpoint.save(model, tmp_path / "ckpt" / "m.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary file left behind
    meta = checkpoint.read_metadata(path)
    assert meta["ltmdsl.spec"] == model.ir.source_text and meta["ltmdsl.model"] == model.ir.name
    back = ltmdsl.load_checkpoint(path)
    assert back.ir.source_hash == model.ir.source_hash
    ids = torch.arange(10)[None] % model.ir.vocab
    assert torch.equal(back(ids), model(ids))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_tied_weights_stored_once(tmp_path):
    from safetensors import safe_open

    model = build(ltmdsl.loads(SHARED))
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys)
    assert "layers.0.mixer.q_proj.weight" in keys and "layers.2.mixer.q_proj.weight" not in keys
    assert "lm_head.weight" not in keys
    assert stored == model.ir.params_total


def test_dtype_is_kept_and_overridable(tmp_path):
    model = build(ltmdsl.loads(SHARED), dtype=torch.bfloat16)
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    assert ltmdsl.load_checkpoint(path).dtype == torch.bfloat16
    assert ltmdsl.load_checkpoint(path, dtype=torch.float32).dtype == torch.float32


def test_refuses_hand_built_ir_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="source_text"):
        checkpoint.save(build(tiny_hybrid_ir()), tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an ltmdsl checkpoint"):
        ltmdsl.load_checkpoint(tmp_path / "foreign.safetensors")


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    model = build(ltmdsl.loads(SHARED))
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(build(ltmdsl.loads(SHARED), seed=9), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
