"""The plan of an imported model and its spec text: validated literals, layer calls, the compressed stack.

`configs.py` reads a Hugging Face config into a `Plan`: model-level settings, layer definitions, a legend
and one token of legend symbols per HF decoder layer (`"A-"`: attention then MLP; `"M"`: one Mamba mixer).
The layer definitions' call texts come from each kind's HF facet (ltmdsl/kinds/<kind>_hf.py, `call`).
`Plan.spec_text()` renders it, turning runs of tokens into `repeat N { pattern "..." }` items (`compress`),
so a 126-layer Llama is one line of stack; the flat order of the symbols is exactly `model.layers` of the
loaded spec, which `weights.py` relies on (`Plan.sublayers`). Every literal that reaches the text passes
through `num`, `boolean` or a fixed identifier, and free text (names, paths, notes) through `sanitize_name`
or `safe_text` (printable ASCII, one line, inside a comment), so a hostile config cannot inject spec syntax.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ltmdsl.hf import HFError

_RESERVED = {"model", "layer", "stack", "repeat", "pattern", "legend", "block", "shared", "budget", "use",
             "for", "on", "with", "require", "training", "inference", "gpu", "true", "false", "none"}


def show_value(value: Any) -> str:
    """A config value for a message: its ASCII repr, shortened."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def safe_text(text: Any, limit: int = 100) -> str:
    """Printable ASCII only, one line, short: safe in a comment or a message."""
    s = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))
    return s if len(s) <= limit else s[:limit - 3] + "..."


def num(value: int | float) -> str:
    """A validated number as a spec literal: ints plain, floats shortest round-trip (`1e-5`, `500000.0`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HFError(f"internal: not a number literal: {show_value(value)}")
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    if "e" in text:
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{int(exp)}"
    return text


def boolean(value: bool) -> str:
    return "true" if value else "false"


def sanitize_name(name: str) -> str:
    """An identifier from an HF model name: `Llama-3.1-8B` -> `Llama_3_1_8B` (never a keyword)."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", str(name))[:64].strip("_") or "model"
    ident = re.sub(r"_+", "_", ident)
    if ident[0].isdigit():
        ident = "m_" + ident
    if ident.lower() in _RESERVED:
        ident += "_hf"
    return ident


# ---------------------------------------------------------------------------------------------------------
# The plan: what the spec says, and which HF layer each sub-layer comes from.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubLayerMap:
    """ltmdsl sub-layer `index` is the `role` part ("mixer" or "ffn") of HF decoder layer `hf_layer`."""

    index: int
    hf_layer: int
    role: str  # "mixer" | "ffn"
    kind: str  # the registered kind name (ltmdsl.kinds.REGISTRY)


@dataclass(frozen=True)
class Plan:
    """One HF config resolved: model-level settings, layer definitions, the legend and one token per HF layer."""

    family: str
    name: str
    vocab: int
    d_model: int
    dtype: str
    norm_eps: float
    tied: bool
    definitions: dict[str, tuple[str, str]]  # layer name -> (kind, call text from the kind's HF facet)
    legend: dict[str, str]  # symbol -> layer name
    tokens: tuple[str, ...]  # the symbols of each HF decoder layer, mixer first
    notes: tuple[str, ...] = ()
    source: str = ""
    hf: dict = field(default_factory=dict)  # resolved HF settings export and tests use (periods, ...)
    zero_centred: bool = False  # every norm scales by (1 + w) (Qwen3-Next, RecurrentGemma)
    embed_scale: float | None = None  # h = embed(ids) * embed_scale (RecurrentGemma: sqrt(d) rounded to bf16)
    logit_cap: float | None = None  # logits = cap * tanh(logits / cap) (RecurrentGemma: logits_soft_cap)
    residual_scale: float | None = None  # h = h + residual_scale * branch (Granite: residual_multiplier)
    logit_scale: float | None = None  # logits * logit_scale (Granite: 1 / logits_scaling)
    #: multi-token-prediction modules (DeepSeek-V3's num_nextn_predict_layers): (depth, mixer definition, ffn
    #: definition); module k's tensors are HF decoder layer len(tokens) + k
    mtp: tuple[int, str, str] | None = None

    @property
    def sublayers(self) -> tuple[SubLayerMap, ...]:
        from ltmdsl.kinds import REGISTRY

        out = []
        for hf_layer, token in enumerate(self.tokens):
            for j, symbol in enumerate(token):
                kind = self.definitions[self.legend[symbol]][0]
                role = "ffn" if REGISTRY[kind].is_ffn else "mixer"
                out.append(SubLayerMap(len(out), hf_layer, role, kind))
        return tuple(out)

    def mtp_sublayers(self, k: int) -> tuple[SubLayerMap, ...]:
        """Multi-token-prediction module k's block (0-based k): its mixer then its FFN, both parts of HF decoder
        layer len(tokens) + k."""
        if self.mtp is None or not 0 <= k < self.mtp[0]:
            return ()
        hf_layer = len(self.tokens) + k
        return tuple(SubLayerMap(j, hf_layer, role, self.definitions[name][0])
                     for j, (role, name) in enumerate((("mixer", self.mtp[1]), ("ffn", self.mtp[2]))))

    def spec_text(self) -> str:
        """The spec: header comment, settings, layer definitions, legend and a compressed stack."""
        lines = [f"# Generated by `ltmdsl import-hf` from {safe_text(self.source or '<dict>')} "
                 f"(model_type {self.family}).",
                 f"# Sub-layer order follows the HF layers: each legend symbol is one sub-layer, "
                 f"{'mixer then FFN' if any(len(t) > 1 for t in self.tokens) else 'one per HF layer'}."]
        lines += [f"# NOTE: {note}" for note in self.notes]
        lines.append(f"model {self.name} {{")
        lines.append(f"    vocab = {num(self.vocab)}")
        lines.append(f"    d_model = {num(self.d_model)}")
        lines.append(f"    dtype = {self.dtype}")
        centred = ", zero_centred = true" if self.zero_centred else ""
        lines.append(f"    norm = rmsnorm(eps = {num(self.norm_eps)}{centred})")
        lines.append(f"    head = {'tied' if self.tied else 'untied'}")
        for setting in ("embed_scale", "residual_scale", "logit_scale", "logit_cap"):
            if getattr(self, setting) is not None:
                lines.append(f"    {setting} = {num(float(getattr(self, setting)))}")
        if self.mtp is not None:
            depth, mixer, ffn = self.mtp
            lines.append(f"    mtp = mtp(depth = {num(depth)}, mixer = {mixer}, ffn = {ffn})")
        lines.append("")
        width = max(len(n) for n in self.definitions)
        for name, (_, call) in self.definitions.items():
            lines.append(f"    layer {name:<{width}} = {call}")
        entries = ", ".join(f"{s if s.isalpha() else json.dumps(s)} = {n}" for s, n in self.legend.items())
        lines.append(f"    legend {{ {entries} }}")
        lines.append("    stack {")
        lines += [f"        {item}" for item in compress(self.tokens)]
        lines.append("    }")
        lines.append("}")
        return "\n".join(lines) + "\n"


def compress(tokens: tuple[str, ...] | list[str], max_unit: int = 64) -> list[str]:
    """Stack items for a token sequence: the longest-covering repeats first, literal patterns between.

    Greedy from the left: at each position pick the unit length u (in tokens) whose consecutive repeats
    cover the most tokens (ties: the shorter unit); two or more repeats become `repeat N { pattern "..." }`.
    """
    out: list[str] = []
    literal: list[str] = []
    i, n = 0, len(tokens)
    while i < n:
        best_u, best_c = 1, 1
        for u in range(1, min(max_unit, n - i) + 1):
            unit = list(tokens[i:i + u])
            c = 1
            while i + (c + 1) * u <= n and list(tokens[i + c * u:i + (c + 1) * u]) == unit:
                c += 1
            if c >= 2 and c * u > best_c * best_u:
                best_u, best_c = u, c
        if best_c >= 2:
            if literal:
                out.append(f'pattern "{" ".join(literal)}"')
                literal = []
            out.append(f'repeat {best_c} {{ pattern "{" ".join(tokens[i:i + best_u])}" }}')
            i += best_u * best_c
        else:
            literal.append(tokens[i])
            i += 1
    if literal:
        out.append(f'pattern "{" ".join(literal)}"')
    return out
