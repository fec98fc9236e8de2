"""The Hugging Face registry: each layer kind's HF facet (ltmdsl/kinds/<kind>_hf.py), keyed by kind name.

    from ltmdsl.kinds.hf import hf_facet
    hf_facet(layer.kind).write(layer.mixer, "jamba", d_model)

One line per kind, beside `ltmdsl.kinds.REGISTRY`: an `HFFacet` (see ltmdsl.hf.facet); for a kind no
Hugging Face family has, `NoHFCounterpart(name, reason)`; for a kind transformers has but ltmdsl does not map
yet, `HFNotMappedYet(name, model_types)`. tests/kinds/test_registry.py fails for a registered kind with none. Pure: `ltmdsl import-hf` of a config needs no torch.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, HFNotMappedYet, NoHFCounterpart
from ltmdsl.kinds import (attention_hf, gated_deltanet_hf, kda_hf, lightning_hf, mamba2_hf, mamba_hf, mla_hf, mlp_hf,
                          mlstm_hf, moe_hf, parallel_hf, rg_lru_hf, short_conv_hf, transformer_block_hf)

#: kind name -> its HF facet, or the explicit statement that it has no Hugging Face counterpart.
HF_REGISTRY: dict[str, HFFacet | NoHFCounterpart | HFNotMappedYet] = {
    f.name: f for f in (
        attention_hf.HF, mamba_hf.HF, mamba2_hf.HF, mlp_hf.HF, moe_hf.HF,
        mla_hf.HF,  # deepseek_v2, deepseek_v3, kimi_linear
        gated_deltanet_hf.HF,  # qwen3_next, qwen3_5, qwen3_5_moe
        kda_hf.HF,  # kimi_linear
        short_conv_hf.HF,
        lightning_hf.HF,
        rg_lru_hf.HF,
        mlstm_hf.HF,
        parallel_hf.HF,  # Falcon-H1's attention beside Mamba-2 (Hymba is not in transformers)
        transformer_block_hf.HF,  # Zamba2's shared transformer blocks
    )
}


def hf_facet(kind: str) -> HFFacet:
    """The HF facet of a kind; HFError when the kind declares no counterpart, or has no HF facet at all."""
    facet = HF_REGISTRY.get(kind)
    if isinstance(facet, HFFacet):
        return facet
    if isinstance(facet, NoHFCounterpart):
        raise HFError(f"layer kind '{kind}' has no Hugging Face counterpart: {facet.reason}")
    if isinstance(facet, HFNotMappedYet):
        raise HFError(f"layer kind '{kind}' has Hugging Face counterparts (model types "
                      f"{', '.join(facet.model_types)}), but ltmdsl does not map them yet")
    raise HFError(f"layer kind '{kind}' has no HF facet (the Hugging Face mapping of its weights and config "
                  f"fields); add ltmdsl/kinds/{kind}_hf.py and register it in ltmdsl/kinds/hf.py")


__all__ = ["HF_REGISTRY", "hf_facet"]
