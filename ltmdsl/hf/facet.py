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
    buffers(config, Site, place)  optional: the non-learned tensors transformers saves with the weights for this
                                  sub-layer (lightning's decay tables), which the runtime computes from the config
                                  and its place in the stack: accepted and checked on import, written on export

A kind that no Hugging Face family has declares `NoHFCounterpart(reason)` instead; a kind with neither is
refused where a facet is needed (`hf_facet` raises HFError naming the missing facet), and the registry
coverage test fails for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

#: The transforms a checkpoint tensor may go through on its way to a runtime parameter (and back on export).
OPS = ("copy", "stack", "first_half", "second_half", "plus_one", "rows", "even", "odd", "even_t", "odd_t",
       "transpose", "first_half_t", "second_half_t", "rope_pairs", "swap_halves")


@dataclass(frozen=True)
class Source:
    """How one runtime tensor is made from checkpoint tensors.

    op "copy": the one tensor as is; "stack": per-expert tensors stacked on a new dim 0; "first_half" /
    "second_half": the halves of a fused tensor along dim -2 (gate, up: [E, 2F, d] experts or [2F, d] one
    MLP); "plus_one": the tensor + 1 (a
    zero-centred norm weight, which scales by 1 + w, into a plain one); "rows": the runtime tensor is the
    concatenation along dim 0 of the row blocks `rows` = ((part, start, stop), ...) of the tensors `names`
    (Qwen3.5's separate q/k/v and z projections regrouped by key head, Kimi's three convs as one), which
    must cover each part's rows exactly once. "even" / "odd": the even / odd entries
    of the last dim of an interleaved tensor (gpt-oss's gate_up_proj_bias [E, 2F]: gate, up, gate, ...), and
    "even_t" / "odd_t" the same transposed in its last two dims ([E, d, 2F] -> [E, F, d]); "first_half_t" /
    "second_half_t": the halves of the last dim, transposed (Llama-4's gate_up_proj [E, d, 2F]: gate, then
    up); "transpose": the last two dims swapped ([E, F, d] <-> [E, d, F]); "rope_pairs": the rows of each
    head of `group` rows reordered from RoPE's interleaved pairs (2i, 2i + 1: Llama-4's complex rotation) to
    the runtime's halves (i, i + group / 2), the even rows first, then the odd ones (q_proj / k_proj weights and
    biases; q.k is unchanged by the same reordering of q and k); "swap_halves": the two halves of the last dim
    exchanged (DeepSeek-V3's eh_proj over [embedding ; h], the runtime's MTP proj over [h ; embedding]).
    Export applies the inverse.
    """

    names: tuple[str, ...]
    op: str = "copy"
    rows: tuple[tuple[int, int, int], ...] = ()
    group: int = 0  # rope_pairs: the rows of one head (head_dim, even)
    #: (rows, factor) segments along dim 0 that multiply the tensor after `op` (export divides): muP multipliers
    #: folded into the weights they follow (Falcon-H1's ssm_multipliers and mlp_multipliers); () = none.
    scales: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"tensor transform must be one of {', '.join(OPS)}, not {self.op!r}")
        if (self.op == "rows") != bool(self.rows):
            raise ValueError("row blocks go with op 'rows', and op 'rows' needs them")
        for part in range(len(self.names) if self.rows else 0):
            blocks = sorted((a, b) for i, a, b in self.rows if i == part)
            ends = [0] + [b for _, b in blocks]
            if not blocks or any(a != end or b <= a for (a, b), end in zip(blocks, ends)):
                raise ValueError(f"row blocks of {self.names[part]} must tile its rows from 0, got {blocks}")
        if (self.op == "rope_pairs") != (self.group > 0) or self.group % 2:
            raise ValueError(f"op rope_pairs needs an even group (head_dim), and only it takes one: {self!r}")

        if self.scales and self.op != "copy":
            raise ValueError("scaled tensors are copied ones (op 'copy')")

    def part_rows(self, part: int) -> int:
        """How many rows checkpoint tensor `names[part]` has under op "rows"."""
        return max(b for i, _, b in self.rows if i == part)


@dataclass(frozen=True)
class Site:
    """Where one sub-layer's tensors sit in a checkpoint.

    family: the model_type; block: the HF decoder layer's prefix (`model.layers.3.`); available: the
    checkpoint's tensor names (None on export: write the first layout); experts: the sub-layer's expert
    count (0 for a dense kind); fused: a forced expert layout (export), None to detect it from `available`;
    layer: the sub-layer's IR config, for transforms that depend on its shape (None where it is not known).
    """

    family: str
    block: str
    available: frozenset[str] | set[str] | None = None
    experts: int = 0
    fused: bool | None = None
    layer: Any = None
    hf: dict = field(default_factory=dict)  # the family's resolved settings (Plan.hf: Llama-4's head_dim)


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
    buffers: Callable[[Any, Site, Any], dict] | None = None

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
