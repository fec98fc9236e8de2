"""The Hugging Face facet of a layer kind: what one kind contributes to import-hf, from_hf and export-hf.

A family module (configs.py reads, export.py writes: model_type -> stack layout and model-level fields)
iterates over the stack and asks each sub-layer's kind for its part through `ltmdsl.kinds.hf.hf_facet`.
Each kind declares, in `ltmdsl/kinds/<kind>_hf.py`, one `HFFacet` (pure: no torch, no transformers):

    families                      the model_types in which this kind appears
    read(Reader, ReadContext)     its spec parameters from a config's fields, in that family's key names
    call(values) -> str           the spec text of a layer definition from those (validated) values
    write(config, family, d)      its config fields in that family's key names (export), HFError if none fit
    misfit(config, family)        why a family has no place for this config (None: it has), for refusals
    traits(config)                the properties export's family choice selects on ("rope", "swiglu", ...)
    modules                       family -> the module(s) inside an HF decoder layer holding its tensors
    tensors(rest, Site)           the checkpoint tensor(s) behind runtime parameter `rest` of this sub-layer,
                                  with the transform declared as data (`Source.op`), applied by weights.py

A kind that no Hugging Face family has declares `NoHFCounterpart(reason)` instead; a kind with neither is
refused where a facet is needed (`hf_facet` raises HFError naming the missing facet), and the registry
coverage test fails for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

#: The transforms a checkpoint tensor may go through on its way to a runtime parameter (and back on export).
OPS = ("copy", "stack", "first_half", "second_half", "plus_one")


@dataclass(frozen=True)
class Source:
    """How one runtime tensor is made from checkpoint tensors.

    op "copy": the one tensor as is; "stack": per-expert tensors stacked on a new dim 0; "first_half" /
    "second_half": the halves of a fused tensor along dim -2 (gate, up: [E, 2F, d] experts or [2F, d] one MLP);
    "plus_one": the tensor + 1 (a
    zero-centred norm weight, which scales by 1 + w, into a plain one). Export applies the inverse.
    """

    names: tuple[str, ...]
    op: str = "copy"
    #: (rows, factor) segments along dim 0 that multiply the tensor after `op` (export divides): muP multipliers
    #: folded into the weights they follow (Falcon-H1's ssm_multipliers and mlp_multipliers); () = none.
    scales: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"tensor transform must be one of {', '.join(OPS)}, not {self.op!r}")
        if self.scales and self.op != "copy":
            raise ValueError("scaled tensors are copied ones (op 'copy')")


@dataclass(frozen=True)
class Site:
    """Where one sub-layer's tensors sit in a checkpoint.

    family: the model_type; block: the HF decoder layer's prefix (`model.layers.3.`); available: the
    checkpoint's tensor names (None on export: write the first layout); experts: the sub-layer's expert
    count (0 for a dense kind); fused: a forced expert layout (export), None to detect it from `available`.
    """

    family: str
    block: str
    available: frozenset[str] | set[str] | None = None
    experts: int = 0
    fused: bool | None = None


@dataclass(frozen=True)
class ReadContext:
    """What a kind's `read` may use besides the config's keys: the family, the model width, whether the stack
    has layers of this kind (its keys are still consumed, and checked where the family always checks them),
    and family-level values read once for several kinds (`intermediate_size` of Llama-style families)."""

    family: str
    d_model: int
    present: bool = True
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoHFCounterpart:
    """A kind that no supported Hugging Face family has, and why (shown by export-hf)."""

    name: str
    reason: str


@dataclass(frozen=True)
class HFNotMappedYet:
    """A kind that transformers has (in `model_types`) but whose mapping ltmdsl has not built yet.

    Distinct from `NoHFCounterpart` so that nobody reads "not built" as "does not exist": export-hf and
    import-hf refuse these stacks naming the model types that a mapping would serve.
    """

    name: str
    model_types: tuple[str, ...]


def copy_tensor(facet: "HFFacet", rest: str, site: Site) -> Source:
    """The tensors of a kind that names its parameters as transformers does: `<block><module>.<rest>`."""
    return Source((f"{site.block}{facet.modules[site.family][0]}.{rest}",))


@dataclass(frozen=True)
class HFFacet:
    """One kind's Hugging Face mapping (module docstring). Every field but `tensors` is required."""

    name: str
    label: str  # how messages name its layers ("Mamba-2": "the layers differ in Mamba-2 settings")
    families: tuple[str, ...]
    modules: dict[str, tuple[str, ...]]
    read: Callable[[Any, ReadContext], dict[str, Any]]
    call: Callable[[dict[str, Any]], str]
    write: Callable[[Any, str, int], dict[str, Any]]
    misfit: Callable[[Any, str], "str | None"]
    traits: Callable[[Any], frozenset]
    tensors: Callable[["HFFacet", str, Site], Source] = copy_tensor

    def __post_init__(self) -> None:
        missing = [f for f in ("read", "call", "write", "misfit", "traits", "tensors")
                   if not callable(getattr(self, f))]
        if missing:
            raise TypeError(f"HF facet of '{self.name}' lacks {', '.join(missing)}")
        unplaced = [f for f in self.families if f not in self.modules]
        if unplaced:
            raise TypeError(f"HF facet of '{self.name}' names no tensor module for {', '.join(unplaced)}")

    def source(self, rest: str, site: Site) -> Source:
        """The checkpoint tensor(s) behind this sub-layer's runtime parameter `rest` (`q_proj.weight`)."""
        return self.tensors(self, rest, site)
