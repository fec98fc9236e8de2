"""`ltmdsl.build`: compile a spec into a runnable nn.Module on the chosen back end.

    model = build(spec, backend="torch", dtype=torch.float32, device="cpu", seed=0)

`spec` is IR: a `ModelIR`, or a `SpecIR` / loaded `Spec` (its named model, else the last one). The runtime
never reads files or parses text: `ltmdsl.build` (the top-level API) turns a path into IR first. backend "torch" uses TORCH_KERNELS;
"triton" asks `ltmdsl.codegen.backend.triton_kernels(model_ir)` for a `Kernels` instance (imported only
then, so the torch back end never needs Triton). Weights are drawn from `seed` in fp32 on the CPU and then
cast, so one seed gives the same model on every back end, dtype and device.

Nothing is allocated before it is needed: the modules are constructed on the meta device, cast to the compute
dtype there, and only then given storage on the target device (`to_empty`) and initialised tensor by tensor.
`device="meta"` stops before storage: a 405B model builds in seconds with 0 bytes allocated (shapes, dtypes and
parameter counts are all there, for the memory tools). On any other device `build` first asks the memory model
how many bytes the weights take and refuses (`ModelTooLarge`) a model that would not fit in the memory the
machine has available (Linux MemAvailable for the CPU, the free memory of a CUDA device), before allocating.
"""

from __future__ import annotations

import torch

from ltmdsl.ir import Dtype, ModelIR, SpecIR
from ltmdsl.runtime.kernels import TORCH_KERNELS, Kernels
from ltmdsl.runtime.model import LTModel

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
#: Dtypes a KV cache can be stored in: the compute dtypes and fp8 (the attention kinds write keys and values
#: converted to the cache's dtype and read them back in the compute dtype; `model.new_cache(dtype=...)`).
KV_DTYPES = {**TORCH_DTYPES, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
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


class ModelTooLarge(MemoryError):
    """The memory model says the weights alone exceed the memory available on the target device."""


def available_bytes(device: torch.device) -> int | None:
    """Bytes the target device can still give: MemAvailable (/proc/meminfo) for the CPU, the free memory of a
    CUDA device; None when unknown (another OS, another device type), in which case nothing is refused."""
    if device.type == "cpu":
        from ltmdsl.tensorfile import available_bytes as machine_bytes

        return machine_bytes()
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None


def dtype_ir(dtype: torch.dtype) -> Dtype:
    """The memory model's Dtype of a torch compute dtype (fp64, a test and oracle dtype the spec language does
    not name, by its element size)."""
    from ltmdsl import units

    name = {v: k for k, v in TORCH_DTYPES.items()}[dtype]
    return units.DTYPES.get(name) or Dtype(name, torch.empty((), dtype=dtype).element_size())


def check_fits(ir: ModelIR, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse (ModelTooLarge) a model whose weights, as the memory model counts them, exceed what `device` has
    available; the initialiser's largest fp32 draw is added (init draws one tensor at a time)."""
    free = available_bytes(device)
    if free is None:
        return
    from ltmdsl.memory import weights_bytes
    from ltmdsl.units import format_bytes

    need = weights_bytes(ir, dtype_ir(dtype))
    if need > free:
        raise ModelTooLarge(
            f"model {ir.name!r} needs {format_bytes(need)} of {dtype_ir(dtype).name} weights, but {device} has "
            f"{format_bytes(free)} available; build it with device='meta' (no storage) to inspect it, or choose "
            "a smaller dtype, model or another device"
        )


def construct(ir: ModelIR, kernels: Kernels, dtype: torch.dtype) -> LTModel:
    """The model on the meta device in `dtype`: shapes and dtypes only, no storage and no draws."""
    with torch.device("meta"):
        net = LTModel(ir, kernels)
    return net.to(dtype=dtype)  # on meta: no storage, no copy


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
    """Build the model of `spec` (see module docstring); `init=False` leaves weights for a checkpoint to fill
    (their storage is allocated but not written). `device="meta"` allocates nothing and draws nothing."""
    ir = resolve_model(spec, model)
    kernels = kernels_for(backend, ir)
    dt = torch_dtype(ir, dtype)
    device = torch.device(device)
    if device.type != "meta":
        check_fits(ir, dt, device)
    net = construct(ir, kernels, dt)
    if device.type == "meta":
        return net
    net = net.to_empty(device=device)
    if init:
        net.init_weights(seed)
    return net
