"""`ltmdsl.build`: compile a spec into a runnable nn.Module on the chosen back end.

    model = build(spec, backend="torch", dtype=torch.float32, device="cpu", seed=0)

`spec` is IR: a `ModelIR`, or a `SpecIR` / loaded `Spec` (its named model, else the last one). The runtime
never reads files or parses text: `ltmdsl.build` (the top-level API) turns a path into IR first. backend "torch" uses TORCH_KERNELS;
"triton" asks `ltmdsl.codegen.backend.triton_kernels(model_ir)` for a `Kernels` instance (imported only
then, so the torch back end never needs Triton). Weights are drawn from `seed` in fp32 on the CPU and then
cast, so one seed gives the same model on every back end, dtype and device.
"""

from __future__ import annotations

import torch

from ltmdsl.ir import ModelIR, SpecIR
from ltmdsl.runtime.kernels import TORCH_KERNELS, Kernels
from ltmdsl.runtime.model import LTModel

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
BACKENDS = ("torch", "triton")


def resolve_model(spec, model: str | None = None) -> ModelIR:
    """The ModelIR of a ModelIR, a SpecIR or a loaded Spec (the named model, else the last one)."""
    if isinstance(spec, ModelIR):
        if model is not None and model != spec.name:
            raise KeyError(f"model {model!r} requested, but the IR is model {spec.name!r}")
        return spec
    ir = getattr(spec, "ir", spec)
    if isinstance(ir, SpecIR):
        return ir.model(model)
    raise TypeError(f"cannot build from {type(spec).__name__}: the runtime takes a ModelIR or SpecIR "
                    "(use ltmdsl.build(path) or ltmdsl.loads(text) to parse a spec first)")


def torch_dtype(ir: ModelIR, dtype: torch.dtype | str | None) -> torch.dtype:
    """The compute dtype: the argument if given, else the spec's `dtype` (fp8 specs need an explicit one)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or ir.dtype.name
    if name not in TORCH_DTYPES:
        raise ValueError(
            f"model {ir.name!r} stores weights as {name}, which the runtime cannot compute in; "
            f"pass dtype=torch.bfloat16 (or another of {sorted(TORCH_DTYPES)})"
        )
    return TORCH_DTYPES[name]


def kernels_for(backend: str, ir: ModelIR) -> Kernels:
    """The kernel bundle of a back end; Triton's is imported lazily with a clear error when missing."""
    if backend == "torch":
        return TORCH_KERNELS
    if backend == "triton":
        try:
            from ltmdsl.codegen.backend import triton_kernels
        except ImportError as exc:
            raise RuntimeError(
                "backend='triton' needs ltmdsl.codegen.backend.triton_kernels, which could not be imported "
                f"({exc}); use backend='torch' or install triton"
            ) from exc
        kernels = triton_kernels(ir)
        if not isinstance(kernels, Kernels):
            raise TypeError(f"triton_kernels returned {type(kernels).__name__}, expected runtime.kernels.Kernels")
        return kernels
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def build(
    spec,
    backend: str = "torch",
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    model: str | None = None,
    init: bool = True,
) -> LTModel:
    """Build the model of `spec` (see module docstring); `init=False` leaves weights for a checkpoint to fill."""
    ir = resolve_model(spec, model)
    kernels = kernels_for(backend, ir)
    net = LTModel(ir, kernels)
    if init:
        net.init_weights(seed)
    return net.to(device=device, dtype=torch_dtype(ir, dtype))
