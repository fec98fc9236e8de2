"""The Triton back end: from a ModelIR to a `Kernels` bundle running on generated kernels.

    kernels = triton_kernels(model_ir)      # ltmdsl.runtime.build calls this for backend="triton"

For each distinct layer configuration of the model (attention GQA group / head dims / causal / window,
conv taps / bias, SSM state sizes and chunk, the norms' width) the matching `KernelSpec`s are rendered,
linted, written to the kernel cache and imported up front, so a bad configuration fails at build time
and not in the middle of a forward pass. The returned callables (codegen/ops.py) have the signatures
of docs/CONTRACTS.md; a call with a configuration not seen at build time (another dtype, say) compiles
its kernels on first use through the same memoised cache.

The bundle is the PyTorch reference (every op the runtime kinds declare) with the ops that have generated
kernels overridden (`triton_ops`); an op without one, such as a new kind's, runs its PyTorch reference on
this back end, and `Kernels.provider(op)` says which.

`compile_model` returns the compiled modules for inspection (`ltmdsl compile`, `ltmdsl emit`).
"""

from __future__ import annotations

from ltmdsl.codegen import ops
from ltmdsl.codegen.cache import CompiledKernel, compile_spec
from ltmdsl.codegen.kernelspec import KernelSpec, specs_for_model


def model_specs(model, dtype: str | None = None, upcast: bool | None = None) -> list[KernelSpec]:
    """The distinct kernel specs of a ModelIR (see kernelspec.specs_for_model)."""
    return specs_for_model(model, dtype=dtype, upcast=upcast)


def compile_model(model, dtype: str | None = None, upcast: bool | None = None) -> list[CompiledKernel]:
    """Render, lint, cache and import every kernel module the model needs."""
    return [compile_spec(spec) for spec in model_specs(model, dtype, upcast)]


def triton_ops() -> dict:
    """The kernel ops that have generated Triton kernels: op name -> host wrapper (codegen/ops.py)."""
    return {
        "attention": ops.attention,
        "attention_decode": ops.attention_decode,
        "causal_conv1d": ops.causal_conv1d,
        "conv_step": ops.conv_step,
        "selective_scan": ops.selective_scan,
        "selective_step": ops.selective_step,
        "ssd_scan": ops.ssd_scan,
        "ssd_step": ops.ssd_step,
        "add_rmsnorm": ops.add_rmsnorm,
        "gated_delta_chunked": ops.gated_delta_chunked,
        "gated_delta_step": ops.gated_delta_step,
    }


def triton_kernels(model=None, dtypes: tuple[str, ...] | None = None):
    """A `ltmdsl.runtime.kernels.Kernels` named "triton": the reference bundle with `triton_ops` overriding
    the ops they cover, on kernels generated for `model`'s layer configs.

    `dtypes` lists the activation dtypes to compile ahead of time (default: the model's dtype, when
    Triton has kernels for it, else fp32). Backward passes recompute the PyTorch reference under
    autograd (see codegen/ops.py); dtypes without kernels (fp64) run the reference op.
    """
    from ltmdsl.runtime.kernels import reference_kernels

    if model is not None:
        for dtype in dtypes or (None,):
            compile_model(model, dtype)
    return reference_kernels().override("triton", triton_ops())
