"""End to end: a model built with backend="triton" gives the logits of backend="torch" (prefill and
decode) on examples/tiny-hybrid.ltm, which has every mixer kind; plus the backend's compile step."""

import torch

import ltmdsl
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
from helpers import assert_close
from ltmdsl.codegen import ops
from ltmdsl.codegen.backend import compile_model, model_specs, triton_kernels
from ltmdsl.runtime.kernels import Kernels

TINY = EXAMPLES / "tiny-hybrid.ltm"


def test_model_specs_cover_every_layer_config():
    model = ltmdsl.load(TINY).model
    names = [s.name for s in model_specs(model, dtype="fp32", upcast=True)]
    assert len(names) == len(set(names))
    families = {s.family for s in model_specs(model, dtype="fp32")}
    assert families == {"attention", "attention_decode", "conv", "selective_scan", "ssd", "rmsnorm"}
    # the window layer (G = 4) and the global layer (G = 2) get different attention kernels
    assert "attention_g4_d16_causal_window_fp32_interp" in names and "attention_g2_d16_causal_fp32_interp" in names
    compiled = compile_model(model, dtype="fp32")
    assert all(ck.path.exists() for ck in compiled)


def test_triton_kernels_is_a_kernels_bundle():
    k = triton_kernels(ltmdsl.load(TINY).model)
    assert isinstance(k, Kernels) and k.name == "triton"


def test_tiny_hybrid_logits_match_torch_backend_prefill_and_decode():
    spec = ltmdsl.load(TINY)
    ref = ltmdsl.build(spec, backend="torch", seed=0)
    fast = ltmdsl.build(spec, backend="triton", seed=0)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    before = sum(ops.FALLBACKS.values())
    with torch.no_grad():
        assert_close(fast(ids), ref(ids), 1e-4, "prefill logits")
        c_ref, c_fast = ref.new_cache(2, 24), fast.new_cache(2, 24)
        assert_close(fast(ids[:, :17], c_fast), ref(ids[:, :17], c_ref), 1e-4, "cached prefill logits")
        for t in (17, 18):  # decode past the 16-slot ring of the window layer
            assert_close(fast(ids[:, t:t + 1], c_fast), ref(ids[:, t:t + 1], c_ref), 1e-4, f"decode logits {t}")
    assert sum(ops.FALLBACKS.values()) == before  # every op ran on a generated kernel
