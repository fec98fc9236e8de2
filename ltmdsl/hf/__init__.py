"""Hugging Face interop: published `config.json` files to ltmdsl specs, checkpoints to runtime models, and back.

    text = ltmdsl.hf.spec_from_hf("path/to/folder")        # config.json -> spec text (configs.py)
    model = ltmdsl.from_hf("path/to/folder")                # + the checkpoint's weights (load.py)
    ltmdsl.hf.export_hf(model, "out/")                      # runtime model -> HF folder (export.py)

Modules, by model family: `configs` (each family's config.json -> a `Plan`: stack layout and model-level
fields), `export` (runtime model -> config.json + model.safetensors), `weights` (HF tensor names <-> runtime
parameter names), `load` (checkpoint reading and `from_hf`); shared: `reader` (typed config access), `spec`
(the `Plan` and its spec text), `facet` (the `HFFacet` record). What belongs to one layer kind (its config
keys, spec text, export fields, tensor names and their transforms) is its HF facet, beside the kind in
`ltmdsl/kinds/<kind>_hf.py`, found through `ltmdsl.kinds.hf.hf_facet`. Only `load` and `export` need torch.

Every problem with the input (an unsupported family or field, a missing tensor, a shape mismatch) raises
`HFError`, which names the file and says what is supported.
"""

from __future__ import annotations


class HFError(Exception):
    """A Hugging Face config or checkpoint that ltmdsl cannot import or export; `path` names the culprit."""

    def __init__(self, message: str, path: str | None = None):
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def render(self, default_path: str = "ltmdsl") -> str:
        """The CLI form, `path: error: message`."""
        return f"{self.path or default_path}: error: {self.message}"


def spec_from_hf(path, **kwargs) -> str:
    """Spec text for a config.json (or the folder holding it); see `configs.spec_from_config`."""
    from ltmdsl.hf.configs import read_config, spec_from_config

    cfg, cfg_path = read_config(path)
    return spec_from_config(cfg, source=cfg_path, **kwargs)


def from_hf(path, **kwargs):
    """A runtime model with a checkpoint's weights; see `load.from_hf`."""
    from ltmdsl.hf.load import from_hf as _from_hf

    return _from_hf(path, **kwargs)


def export_hf(model, out_dir, **kwargs):
    """Write a runtime model as a Hugging Face folder; see `export.export_hf`."""
    from ltmdsl.hf.export import export_hf as _export_hf

    return _export_hf(model, out_dir, **kwargs)


__all__ = ["HFError", "export_hf", "from_hf", "spec_from_hf"]
