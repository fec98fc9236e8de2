"""`build(device="meta")` allocates nothing, other devices are refused up front when the weights cannot fit, and
the meta-first construction draws exactly the weights the old fp32-on-CPU path drew."""

from __future__ import annotations

import resource

import pytest
import torch

import ltmdsl
from ltmdsl.runtime import build as build_mod
from ltmdsl.runtime.kernels import TORCH_KERNELS
from ltmdsl.runtime.model import LTModel
from tests.paths import EXAMPLES


def test_405b_builds_on_meta_without_allocating():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    model = ltmdsl.build(EXAMPLES / "llama-3.1-405b.ltm", device="meta", dtype="bf16")
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert model.num_parameters() == model.ir.params_total == 405_853_388_800
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert grown < 256 * 2**20, f"building on meta grew the resident set by {grown:,} B"  # weights: 812 GB


def test_too_large_model_is_refused_before_allocation(monkeypatch):
    ir = ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm").model
    monkeypatch.setattr(build_mod, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(LTModel, "to_empty", lambda *a, **k: pytest.fail("allocated before refusing"))
    with pytest.raises(build_mod.ModelTooLarge, match=r"tiny_hybrid.*fp32 weights.*device='meta'"):
        ltmdsl.build(ir)
    assert ltmdsl.build(ir, device="meta").num_parameters() == ir.params_total  # meta is never refused


def test_405b_is_refused_on_this_cpu():
    free = build_mod.available_bytes(torch.device("cpu"))
    if free is None or free >= 812 * 10**9:
        pytest.skip("no MemAvailable, or a machine that holds 812 GB")
    with pytest.raises(build_mod.ModelTooLarge, match="755.96 GiB of bf16 weights"):
        ltmdsl.build(EXAMPLES / "llama-3.1-405b.ltm", dtype="bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_meta_first_build_draws_the_same_weights(dtype):
    ir = ltmdsl.load(EXAMPLES / "tiny-hybrid.ltm").model
    old = LTModel(ir, TORCH_KERNELS)  # the previous path: fp32 on the CPU, seeded draws, then cast
    old.init_weights(7)
    old = old.to(dtype)
    new = ltmdsl.build(ir, seed=7, dtype=dtype)
    ref, got = old.state_dict(), new.state_dict()
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
