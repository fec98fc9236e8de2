"""End to end: a model built with backend="triton" gives the logits of backend="torch" (prefill and
decode) on examples/tiny-hybrid.ltm, which has every mixer kind; plus the backend's compile step."""

import collections

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
                                 ops={"newcomer_scan": new_op}, oracles={}, state_names=MLP_KIND.state_names,
                                 outputs=MLP_KIND.outputs, trace_loops=MLP_KIND.trace_loops,
                                 cp_inference=None)
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


def test_delta_rule_layers_run_the_generated_kernels_prefill_and_cached_decode(monkeypatch):
    """backend="triton" runs Gated DeltaNet and KDA on the generated delta-rule kernels: a cached prefill that
    ends mid-chunk (batch 2), then cached decode steps, with the logits of backend="torch" (1e-4) and no
    fallback (the tiny-hybrid test above covers the uncached prefill)."""
    launched = collections.Counter()

    def spy(name, launch):
        def counted(q, k, v, g, *args, **kwargs):
            launched[name, "per channel" if g.dim() == v.dim() else "per head"] += 1
            return launch(q, k, v, g, *args, **kwargs)
        return counted

    monkeypatch.setattr(ops, "_gated_delta_chunked", spy("chunked", ops._gated_delta_chunked))
    monkeypatch.setattr(ops, "_gated_delta_step", spy("step", ops._gated_delta_step))
    spec = ltmdsl.loads("""
model delta_on_triton {
    vocab = 64
    d_model = 32
    dtype = fp32
    layer gdn = gated_deltanet(key_heads = 1, value_heads = 2, head_dim = 16, chunk = 16)
    layer kda = kda(heads = 2, head_dim = 16, chunk = 8)
    layer f = mlp(d_ff = 32)
    stack { gdn f kda f }
}
""")
    ref = ltmdsl.build(spec, backend="torch", seed=0)
    fast = ltmdsl.build(spec, backend="triton", seed=0)
    for layer in (fast.layers[0], fast.layers[2]):
        assert layer.mixer.kernels.provider("gated_delta_chunked") == "triton"
        assert layer.mixer.kernels.provider("gated_delta_step") == "triton"
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    before = sum(ops.FALLBACKS.values())
    with torch.no_grad():
        c_ref, c_fast = ref.new_cache(2, 24), fast.new_cache(2, 24)
        assert_close(fast(ids[:, :19], c_fast), ref(ids[:, :19], c_ref), 1e-4, "cached prefill logits")
        assert launched == {("chunked", "per head"): 1, ("chunked", "per channel"): 1}  # KDA's chunk 8 tiles as 16
        for t in (19, 20):
            assert_close(fast(ids[:, t:t + 1], c_fast), ref(ids[:, t:t + 1], c_ref), 1e-4, f"decode logits {t}")
    assert sum(ops.FALLBACKS.values()) == before
    assert launched[("step", "per head")] == launched[("step", "per channel")] == 2  # one per decoded token
