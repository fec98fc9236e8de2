"""ltmdsl: a compiler-driven model definition language for long-context hybrid models.

    spec = ltmdsl.load("examples/tiny-hybrid.ltm")     # a path; parse + resolve; raises SpecError on bad input
    spec = ltmdsl.loads(text, name="inline.ltm")        # spec text (like json.load / json.loads)
    model = ltmdsl.build(spec, backend="torch")         # an nn.Module (imports torch lazily)
    model = ltmdsl.load_checkpoint("m.safetensors")     # parses the embedded spec, fills the weights

`load`, `check` and the memory model never import torch or triton. The re-exports below are resolved
lazily (module `__getattr__`), so `import ltmdsl.runtime` or `import ltmdsl.codegen`, which take a
`ModelIR`, never import the parser or lark.
"""

from __future__ import annotations

import contextlib
import os

__version__ = "0.1.0"

_LAZY = {
    "Diagnostic": ("ltmdsl.errors", "Diagnostic"),
    "SpecError": ("ltmdsl.errors", "SpecError"),
    "Spec": ("ltmdsl.loader", "Spec"),
    "load": ("ltmdsl.loader", "load"),
    "loads": ("ltmdsl.loader", "loads"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ltmdsl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


@contextlib.contextmanager
def _extras():
    """A missing optional package (torch, triton, ...) as an error that names the extra to install."""
    try:
        yield
    except ModuleNotFoundError as e:
        from ltmdsl.cli import missing_extra

        message = missing_extra(e)
        if message is None:
            raise
        raise ModuleNotFoundError(message, name=e.name) from None


def _model_ir(spec, model: str | None):
    """The ModelIR of a path, a loaded Spec, a SpecIR or a ModelIR (the named model, else the last one).

    Paths are read here, at the top level, so that the runtime only ever sees IR.
    """
    from ltmdsl.ir import ModelIR, SpecIR

    if isinstance(spec, ModelIR):
        if model is not None and model != spec.name:
            raise KeyError(f"model {model!r} requested, but the IR is model {spec.name!r}")
        return spec
    if isinstance(spec, (str, os.PathLike)):
        from ltmdsl.loader import load

        spec = load(spec)
    ir = getattr(spec, "ir", spec)
    if isinstance(ir, SpecIR):
        return ir.model(model)
    raise TypeError(f"cannot build from {type(spec).__name__}: expected a path, a Spec, a SpecIR or a ModelIR "
                    "(for spec text, call ltmdsl.loads(text) first)")


def build(spec, backend: str = "torch", *, model: str | None = None, **kwargs):
    """Compile a spec (a path, a loaded Spec, a SpecIR or a ModelIR) into a runnable nn.Module.

    See ltmdsl.runtime.build for the keyword arguments (dtype, device, seed, init).
    """
    ir = _model_ir(spec, model)
    with _extras():
        from ltmdsl.runtime.build import build as _build

        return _build(ir, backend=backend, **kwargs)


def load_checkpoint(path, **kwargs):
    """A runtime model from a checkpoint written by ltmdsl.runtime.checkpoint.save; see ltmdsl.checkpoints."""
    with _extras():
        from ltmdsl.checkpoints import load_checkpoint as _load

        return _load(path, **kwargs)


def from_hf(path, **kwargs):
    """A runtime model with the weights of a Hugging Face checkpoint folder; see ltmdsl.hf."""
    with _extras():
        from ltmdsl.hf.load import from_hf as _from_hf

        return _from_hf(path, **kwargs)


__all__ = ["Diagnostic", "Spec", "SpecError", "build", "from_hf", "load", "load_checkpoint", "loads", "__version__"]
