"""Self-describing checkpoints: safetensors weights with the spec text in the metadata.

    save(model, "m.safetensors")                 # atomic: written to a temporary file, then os.replace
    model = load("m.safetensors", ir)            # the runtime half: checks the header, builds `ir`, fills it
    model = ltmdsl.load_checkpoint("m.safetensors")   # the top-level loader: parses the embedded spec first

Tensors are stored under the parameter names of docs/CONTRACTS.md, each shared (tied) tensor once, under
the first name `named_parameters()` gives it, and persistent buffers beside them (the MoE's selection bias: state
that is not a parameter, as transformers counts it, yet part of the model). Metadata keys: ltmdsl.spec (the model's source text),
ltmdsl.model (its name), ltmdsl.source_hash, ltmdsl.structure_hash (the model without its source: `ModelIR.structure_hash`), ltmdsl.version, ltmdsl.dtype. The runtime never parses spec
text: `load` takes the ModelIR (ltmdsl/checkpoints.py parses the embedded text and hands it over).
Before anything is allocated, every tensor's name, shape and dtype in the header is compared with the
model (built on the meta device, which allocates nothing) and the model's bytes with the memory available.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ltmdsl
from ltmdsl import atomic
from ltmdsl.ir import ModelIR
from ltmdsl.runtime.build import build, kernels_for
from ltmdsl.runtime.model import LTModel
from ltmdsl.tensorfile import TORCH_TO_SAFETENSORS, Header, TensorInfo, check_fits, check_tensors, read_header


def stored_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of everything a checkpoint holds: the parameters (each shared one once) and the
    persistent buffers (those `state_dict` keeps), in `named_parameters()` / `named_buffers()` order."""
    persistent = set(model.state_dict(keep_vars=True))
    return {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in persistent}}


def save(model: LTModel, path: str | os.PathLike) -> Path:
    """Write `model`'s weights and spec text to `path` atomically; returns the path."""
    ir = model.ir
    if not ir.source_text:
        raise ValueError(f"model {ir.name!r} has no source_text (built from a hand-made IR?): "
                         "a checkpoint must carry its spec; build it from ltmdsl.load(...)")
    tensors = {name: p.detach().contiguous().cpu() for name, p in stored_tensors(model).items()}
    meta = {
        "ltmdsl.spec": ir.source_text,
        "ltmdsl.model": ir.name,
        "ltmdsl.source_hash": ir.source_hash,
        "ltmdsl.structure_hash": ir.structure_hash,
        "ltmdsl.version": ltmdsl.__version__,
        "ltmdsl.dtype": str(model.dtype).removeprefix("torch."),
    }
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.temporary_sibling(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except OSError as e:  # an unwritable place: say which file, keep the errno for callers
        raise type(e)(e.errno, f"cannot write checkpoint {path}: {e.strerror or e}") from None
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The checkpoint's metadata, read from its validated header (no tensor is read)."""
    return read_header(path).metadata


def expected_tensors(ir: ModelIR, stored: torch.dtype) -> dict[str, TensorInfo]:
    """name -> (safetensors dtype, shape) of every tensor a checkpoint of `ir` stored in `stored` holds.

    The model is built on the meta device: shapes without a single byte allocated.
    """
    with torch.device("meta"):
        net = LTModel(ir, kernels_for("torch", ir))
    code = TORCH_TO_SAFETENSORS[str(stored).removeprefix("torch.")]
    return {name: TensorInfo(code, tuple(p.shape)) for name, p in stored_tensors(net).items()}


def warn_nonfinite(tensors, where: str) -> list[str]:
    """Warn (one line) naming the tensors of `tensors` ((name, tensor) pairs) holding NaN or inf; returns them."""
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        warnings.warn(f"{where}: NaN or inf in {len(bad)} tensor{'s' if len(bad) > 1 else ''}: "
                      f"{', '.join(bad[:8])}{more}", RuntimeWarning, stacklevel=2)
    return bad


def load(
    path: str | os.PathLike,
    ir: ModelIR,
    *,
    stored_dtype: torch.dtype = torch.float32,
    backend: str = "torch",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    header: Header | None = None,
) -> LTModel:
    """Build `ir` and fill it with the weights of the checkpoint at `path`, saved in `stored_dtype`.

    dtype (the compute dtype) defaults to `stored_dtype`. Raises ValueError (TensorFileError) when the
    header does not hold exactly the model's tensors with their shapes and dtype, or when the model would
    not fit in the memory available, before allocating anything. Warns when a tensor holds NaN or inf.
    """
    header = header or read_header(path)
    dtype = dtype or stored_dtype
    check_tensors(header, expected_tensors(ir, stored_dtype), what=f"model {ir.name}")
    # the model is built in fp32 on the CPU, then cast; each tensor is read once more while copying
    build_bytes = ir.params_total * (4 + (torch.empty((), dtype=dtype).element_size() if dtype != torch.float32 else 0))
    check_fits(build_bytes + max((t.nbytes for t in header.tensors.values()), default=0), f"model {ir.name}")
    model = build(ir, backend=backend, device=device, dtype=dtype, init=False)
    params = stored_tensors(model)
    with safe_open(str(path), framework="pt", device="cpu") as f, torch.no_grad():
        for name, p in params.items():
            p.copy_(f.get_tensor(name))
    warn_nonfinite(params.items(), str(path))
    return model
