"""The Hugging Face registry: each layer kind's HF facet (ltmdsl/kinds/<kind>_hf.py), keyed by kind name.

    from ltmdsl.kinds.hf import hf_facet
    hf_facet(layer.kind).write(layer.mixer, "jamba", d_model)

One line per kind, beside `ltmdsl.kinds.REGISTRY`: an `HFFacet` (see ltmdsl.hf.facet) or, for a kind no
supported Hugging Face family has, `NoHFCounterpart(name, reason)`. tests/kinds/test_registry.py fails for a
registered kind with neither. Pure: `ltmdsl import-hf` of a config needs no torch.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, NoHFCounterpart
from ltmdsl.kinds import attention_hf, mamba2_hf, mamba_hf, mlp_hf, moe_hf

#: kind name -> its HF facet, or the explicit statement that it has no Hugging Face counterpart.
HF_REGISTRY: dict[str, HFFacet | NoHFCounterpart] = {
    f.name: f for f in (attention_hf.HF, mamba_hf.HF, mamba2_hf.HF, mlp_hf.HF, moe_hf.HF)
}


def hf_facet(kind: str) -> HFFacet:
    """The HF facet of a kind; HFError when the kind declares no counterpart, or has no HF facet at all."""
    facet = HF_REGISTRY.get(kind)
    if isinstance(facet, HFFacet):
        return facet
    if isinstance(facet, NoHFCounterpart):
        raise HFError(f"layer kind '{kind}' has no Hugging Face counterpart: {facet.reason}")
    raise HFError(f"layer kind '{kind}' has no HF facet (the Hugging Face mapping of its weights and config "
                  f"fields); add ltmdsl/kinds/{kind}_hf.py and register it in ltmdsl/kinds/hf.py")


__all__ = ["HF_REGISTRY", "hf_facet"]
