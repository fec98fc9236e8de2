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
    assert families == {"attention", "attention_decode", "conv", "selective_scan", "ssd", "rmsnorm", "gated_delta"}
    # the window layer (G = 4) and the global layer (G = 2) get different attention kernels
    assert "attention_g4_d16_causal_window_fp32_interp" in names and "attention_g2_d16_causal_fp32_interp" in names
    # Gated DeltaNet (a decay per head) and KDA (a decay per key channel) get different delta-rule kernels
    assert "gated_delta_d16_c16_l2norm_fp32_interp" in names
    assert "gated_delta_d16_c16_per_channel_l2norm_fp32_interp" in names
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


def test_triton_bundle_overrides_only_the_ops_it_has_kernels_for():
    from ltmdsl.runtime.kernels import TORCH_KERNELS

    from ltmdsl.codegen.backend import triton_ops

    k = triton_kernels()
    assert k.names() == TORCH_KERNELS.names()
    for op in k.names():
        if op in triton_ops():
            assert k.provider(op) == "triton" and k[op] is triton_ops()[op]
        else:
            assert k.provider(op) == "torch" and k[op] is TORCH_KERNELS[op]
    assert set(triton_ops()) <= TORCH_KERNELS.names()


def test_a_kind_without_a_triton_kernel_runs_its_reference_op(monkeypatch):
    """Registering a runtime kind that declares a new op needs no codegen edit: the triton bundle carries
    the kind's PyTorch op, and the kernel specs skip the kind."""
    from ltmdsl.codegen.kernelspec import specs_for_layer
    from ltmdsl.runtime import kinds
    from ltmdsl.runtime.kinds.mlp import KIND as MLP_KIND

    def new_op(x):
        return x

    newcomer = kinds.RuntimeKind(name="newcomer", module=MLP_KIND.module, build=MLP_KIND.build, new_cache=None,
                                 ops={"newcomer_scan": new_op}, oracles={}, state_names=MLP_KIND.state_names)
    monkeypatch.setattr(kinds, "RUNTIME_REGISTRY", {**kinds.RUNTIME_REGISTRY, "newcomer": newcomer})
    k = triton_kernels()
    assert k.newcomer_scan is new_op and k.provider("newcomer_scan") == "torch"
    assert k.provider("attention") == "triton"

    class Layer:  # a sub-layer of the new kind, as specs_for_layer reads it
        kind, mixer, d_model = "newcomer", None, 64
        norm = ltmdsl.load(TINY).model.layers[0].norm

    assert [s.family for s in specs_for_layer(Layer(), "fp32", upcast=True)] == ["rmsnorm"]


def test_kernel_spec_table_is_keyed_by_registered_kinds():
    from ltmdsl.codegen.kernelspec import KIND_SPECS
    from ltmdsl.kinds import REGISTRY

    assert set(KIND_SPECS) <= set(REGISTRY)


def test_model_runs_on_triton_with_a_kind_whose_ops_have_no_kernel(monkeypatch):
    """End to end: with Mamba-1's scan ops taken out of the Triton table (as for a kind that has no kernel
    yet), backend="triton" runs them on the PyTorch reference and the logits still match backend="torch"."""
    from ltmdsl.codegen import backend

    kept = {k: v for k, v in backend.triton_ops().items() if k not in ("selective_scan", "selective_step")}
    monkeypatch.setattr(backend, "triton_ops", lambda: kept)
    spec = ltmdsl.loads("""
model scan_on_torch {
    vocab = 32
    d_model = 32
    dtype = fp32
    layer m = mamba(d_state = 4)
    layer f = mlp(d_ff = 32)
    stack { m f }
}
""")
    ref = ltmdsl.build(spec, backend="torch", seed=0)
    fast = ltmdsl.build(spec, backend="triton", seed=0)
    k = fast.layers[0].mixer.kernels
    assert k.provider("selective_scan") == "torch" and k.provider("causal_conv1d") == "triton"
    ids = torch.randint(0, 32, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(fast(ids), ref(ids), 1e-4, "prefill logits")
        c_ref, c_fast = ref.new_cache(1, 10), fast.new_cache(1, 10)
        fast(ids, c_fast), ref(ids, c_ref)
        assert_close(fast(ids[:, :1], c_fast), ref(ids[:, :1], c_ref), 1e-4, "decode logits")
