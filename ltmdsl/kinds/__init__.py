"""The layer-kind registry: the only dispatch from a layer config to its front-end, memory and show facets.

    from ltmdsl.kinds import REGISTRY, kind_of
    kind_of(layer.mixer).cache(layer.mixer, settings)

One module per kind (ltmdsl/kinds/<kind>.py) holds its IR config and its `Kind` (see
`ltmdsl.kinds.base` for the facets and their signatures). Adding a kind is one module and one line
here; docs/ADDING_A_KIND.md walks through it. Nothing here imports torch.
"""

from __future__ import annotations

from ltmdsl.kinds import (attention, gated_deltanet, kda, lightning, mamba, mamba2, mla, mlp, mlstm, moe, parallel,
                          rg_lru, short_conv, transformer_block)
from ltmdsl.kinds.base import (
    NORM_PARAM, POST_NORM_PARAM, RESIDUAL_PARAMS, CheckError, Kind, KindError, ModelContext, Param,
)

#: Every kind a `layer NAME = KIND(...)` definition may use, in documentation order.
REGISTRY: dict[str, Kind] = {
    k.name: k for k in (attention.KIND, mla.KIND, mamba.KIND, mamba2.KIND, gated_deltanet.KIND, kda.KIND,
                        short_conv.KIND, lightning.KIND, rg_lru.KIND, mlstm.KIND, parallel.KIND, transformer_block.KIND,
                        mlp.KIND, moe.KIND)
}


def kind_of(config) -> Kind:
    """The registered kind of a layer config; KindError when its kind is unknown or its class is not the
    registered one (a config the registry does not describe must never be counted as zero)."""
    name = getattr(config, "kind", None)
    kind = REGISTRY.get(name) if isinstance(name, str) else None
    if kind is None or type(config) is not kind.config:
        raise KindError(f"layer config {type(config).__name__} (kind {name!r}) is not a registered layer kind "
                        f"(registered: {', '.join(REGISTRY)}); register it in ltmdsl/kinds/__init__.py")
    return kind


def count_params(config, d_model: int) -> int:
    """Parameters of a mixer or FFN (its norm excluded)."""
    return kind_of(config).count(config, d_model)


__all__ = ["NORM_PARAM", "POST_NORM_PARAM", "RESIDUAL_PARAMS", "REGISTRY",
           "CheckError", "Kind", "KindError", "ModelContext", "Param", "count_params",
           "kind_of"]
