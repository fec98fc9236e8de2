"""Self-describing checkpoints: safetensors weights with the spec text in the metadata.

    save(model, "m.safetensors")      # atomic: written to a temporary file, then os.replace
    model = load("m.safetensors")     # re-parses the embedded spec, rebuilds, fills the weights

Tensors are stored under the parameter names of docs/CONTRACTS.md, each shared (tied) tensor once, under
the first name `named_parameters()` gives it. Metadata keys: ltmdsl.spec (the model's source text),
ltmdsl.model (its name), ltmdsl.source_hash, ltmdsl.version, ltmdsl.dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ltmdsl
from ltmdsl import atomic
from ltmdsl.runtime.build import build
from ltmdsl.runtime.model import LTModel


def save(model: LTModel, path: str | os.PathLike) -> Path:
    """Write `model`'s weights and spec text to `path` atomically; returns the path."""
    ir = model.ir
    if not ir.source_text:
        raise ValueError(f"model {ir.name!r} has no source_text (built from a hand-made IR?): "
                         "a checkpoint must carry its spec; build it from ltmdsl.load(...)")
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}
    meta = {
        "ltmdsl.spec": ir.source_text,
        "ltmdsl.model": ir.name,
        "ltmdsl.source_hash": ir.source_hash,
        "ltmdsl.version": ltmdsl.__version__,
        "ltmdsl.dtype": str(model.dtype).removeprefix("torch."),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.temporary_sibling(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load(
    path: str | os.PathLike,
    *,
    backend: str = "torch",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LTModel:
    """Rebuild the model from the spec text embedded in `path` and load its weights.

    dtype defaults to the dtype the checkpoint was saved in. Raises ValueError when the file lacks the
    spec, or when its tensors do not match the rebuilt model's names and shapes.
    """
    meta = read_metadata(path)
    if "ltmdsl.spec" not in meta:
        raise ValueError(f"{path}: not an ltmdsl checkpoint (no 'ltmdsl.spec' metadata)")
    spec = ltmdsl.load(meta["ltmdsl.spec"])
    ir = spec.ir.model(meta.get("ltmdsl.model"))
    if dtype is None:
        dtype = getattr(torch, meta.get("ltmdsl.dtype", "float32"))
    model = build(ir, backend=backend, device=device, dtype=dtype, init=False)
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = set(f.keys())
        missing, unexpected = sorted(set(params) - names), sorted(names - set(params))
        if missing or unexpected:
            raise ValueError(f"{path}: tensors do not match the spec (missing {missing[:5]}, unexpected {unexpected[:5]})")
        with torch.no_grad():
            for name, p in params.items():
                t = f.get_tensor(name)
                if t.shape != p.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the spec says {tuple(p.shape)}")
                p.copy_(t)
    return model
