"""ltmdsl: a compiler-driven model definition language for long-context hybrid models.

    spec = ltmdsl.load("examples/tiny-hybrid.ltm")     # parse + resolve; raises SpecError on bad input
    model = ltmdsl.build(spec, backend="torch")         # an nn.Module (imports torch lazily)

`load`, `check` and the memory model never import torch or triton.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ltmdsl.errors import Diagnostic, SpecError  # noqa: E402
from ltmdsl.loader import Spec, load  # noqa: E402


def build(spec, backend: str = "torch", **kwargs):
    """Compile a loaded spec (or a path / text) into a runnable nn.Module; see ltmdsl.runtime.build."""
    from ltmdsl.runtime.build import build as _build

    return _build(spec, backend=backend, **kwargs)


def from_hf(path, **kwargs):
    """A runtime model with the weights of a Hugging Face checkpoint folder; see ltmdsl.hf."""
    from ltmdsl.hf.load import from_hf as _from_hf

    return _from_hf(path, **kwargs)


__all__ = ["Diagnostic", "Spec", "SpecError", "build", "from_hf", "load", "__version__"]
