"""The top-level checkpoint loader: parse the spec a checkpoint embeds, hand its IR to the runtime.

    model = ltmdsl.load_checkpoint("m.safetensors")           # dtype: the one it was saved in

The metadata `ltmdsl.spec` is spec TEXT (`ltmdsl.loads`), never a path; `ltmdsl.model` names the model
and `ltmdsl.dtype` the dtype the tensors were saved in (a float dtype the runtime computes in). Only the
header is read before the runtime (ltmdsl/runtime/checkpoint.py) compares it with the model and checks
that the model fits in memory; nothing is allocated for a file that does not match.
"""

from __future__ import annotations

import os

from ltmdsl.tensorfile import TensorFileError, read_header

#: ltmdsl.dtype values a checkpoint may declare (the runtime's float dtypes).
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def load_checkpoint(path: str | os.PathLike, *, backend: str = "torch", device="cpu", dtype=None):
    """Rebuild the model from the spec text embedded in `path` and load its weights.

    Raises ValueError (TensorFileError) for a file that is not an ltmdsl checkpoint, declares an unknown
    model or a non-float dtype, does not match its spec, or would not fit in memory; SpecError when the
    embedded spec does not load.
    """
    import torch

    from ltmdsl.ast import Use
    from ltmdsl.loader import loads
    from ltmdsl.parser import parse
    from ltmdsl.runtime.checkpoint import load

    p = os.fspath(path)
    header = read_header(p)
    meta = header.metadata
    text = meta.get("ltmdsl.spec")
    if not text:
        raise TensorFileError(f"{p}: not an ltmdsl checkpoint (no 'ltmdsl.spec' metadata)")
    stored = meta.get("ltmdsl.dtype", "float32")
    if stored not in FLOAT_DTYPES:
        raise TensorFileError(f"{p}: ltmdsl.dtype is {stored!r}; expected one of {', '.join(FLOAT_DTYPES)}")
    name = f"{p}[ltmdsl.spec]"
    if any(isinstance(item, Use) for item in parse(text, name).items):
        raise TensorFileError(f"{p}: the embedded spec has a `use` statement; a checkpoint's spec must stand alone")
    spec = loads(text, name=name)
    model_name = meta.get("ltmdsl.model")
    try:
        ir = spec.ir.model(model_name or None)
    except KeyError:
        names = ", ".join(m.name for m in spec.ir.models)
        raise TensorFileError(f"{p}: ltmdsl.model is {model_name!r}, but the embedded spec defines {names}") from None
    return load(p, ir, stored_dtype=getattr(torch, stored), backend=backend, device=device, dtype=dtype,
                header=header)
