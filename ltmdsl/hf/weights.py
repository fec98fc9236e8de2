"""Tensor names: Hugging Face checkpoints <-> the runtime's parameters (docs/CONTRACTS.md).

HF decoder layer i holds a mixer and usually an FFN, each with its own pre-norm; the runtime's flat stack has
one sub-layer per mixer or FFN (`spec.Plan.sublayers` says which HF layer and part each one is). So for
Llama, HF `model.layers.{i}.self_attn.q_proj.weight` is runtime `layers.{2i}.mixer.q_proj.weight` and
`post_attention_layernorm` is the norm of runtime layer 2i+1; for Mamba, HF layer i is runtime layer i.

The family's `Naming` holds the model-level names (prefix, embeddings, final norm, the two pre-norms); what
sits inside a sub-layer belongs to its kind's HF facet (ltmdsl/kinds/<kind>_hf.py: `modules` and `tensors`),
which returns a `Source` whose `op` declares the transform (copy, stack experts, halves of a fused tensor).
`gather` applies those transforms on import and `to_hf` their inverses on export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import Site, Source
from ltmdsl.hf.spec import Plan, SubLayerMap
from ltmdsl.kinds.hf import hf_facet


@dataclass(frozen=True)
class Naming:
    """Where a family keeps its model-level tensors; the first of several prefixes is what export writes."""

    prefixes: tuple[str, ...]  # "model." or "backbone."
    embed: str
    final_norm: str
    mixer_norm: str
    ffn_norm: str
    layers: str = "layers"  # the decoder layers' module list (xLSTM: blocks)
    mixer_post_norm: str = ""  # the norms of the sub-layers' outputs (post_norm; Gemma-3's sandwich norms)
    ffn_post_norm: str = ""


_TRANSFORMER = Naming(prefixes=("model.",), embed="embed_tokens", final_norm="norm", mixer_norm="input_layernorm",
                      ffn_norm="post_attention_layernorm")
_HYBRID = Naming(prefixes=("model.",), embed="embed_tokens", final_norm="final_layernorm",
                 mixer_norm="input_layernorm", ffn_norm="pre_ff_layernorm")
_SSM = Naming(prefixes=("backbone.",), embed="embeddings", final_norm="norm_f", mixer_norm="norm", ffn_norm="")
_GEMMA3 = Naming(prefixes=("model.",), embed="embed_tokens", final_norm="norm", mixer_norm="input_layernorm",
                 ffn_norm="pre_feedforward_layernorm", mixer_post_norm="post_attention_layernorm",
                 ffn_post_norm="post_feedforward_layernorm")
NAMINGS = {
    "llama": _TRANSFORMER, "mistral": _TRANSFORMER, "qwen2": _TRANSFORMER, "qwen3": _TRANSFORMER,
    "mixtral": _TRANSFORMER, "qwen3_next": _TRANSFORMER, "jamba": _HYBRID, "bamba": _HYBRID, "mamba": _SSM,
    "mamba2": _SSM,
    "nemotron_h": Naming(prefixes=("backbone.", "model."), embed="embeddings", final_norm="norm_f",
                         mixer_norm="norm", ffn_norm="norm"),
    "recurrent_gemma": Naming(prefixes=("model.",), embed="embed_tokens", final_norm="final_norm",
                              mixer_norm="temporal_pre_norm", ffn_norm="channel_pre_norm"),
    "lfm2": Naming(prefixes=("model.",), embed="embed_tokens", final_norm="embedding_norm",
                   mixer_norm="operator_norm", ffn_norm="ffn_norm"),
    "xlstm": Naming(prefixes=("backbone.",), embed="embeddings", final_norm="out_norm", mixer_norm="norm_mlstm",
                    ffn_norm="norm_ffn", layers="blocks"),
    "qwen3_moe": _TRANSFORMER, "gpt_oss": _TRANSFORMER, "llama4_text": _TRANSFORMER,
    "gemma3_text": _GEMMA3,
}
#: Multimodal families whose config import-hf reads (its text decoder) but whose checkpoints from_hf does not
#: (their tensors hold the vision tower and projector too, under the multimodal model's names).
TEXT_ONLY = ("gemma3", "llama4")


_LAYER = re.compile(r"^layers\.(\d+)\.(norm|post_norm|mixer)\.(.+)$")


def _prefix(naming: Naming, available: set[str] | None) -> str:
    """The checkpoint's prefix: the candidate whose embedding tensor exists (the first when unknown)."""
    if available is not None:
        for p in naming.prefixes:
            if f"{p}{naming.embed}.weight" in available:
                return p
    return naming.prefixes[0]


def source_of(plan: Plan, name: str, experts: dict[int, int], available: set[str] | None = None,
              *, fused: bool | None = None) -> Source:
    """The checkpoint tensor(s) behind runtime parameter `name`.

    `experts` maps a MoE sub-layer index to its expert count; `available` (the checkpoint's tensor names)
    picks the prefix and each MoE layer's layout; `fused` forces a layout (export).
    """
    if plan.family in TEXT_ONLY:
        raise HFError(f"{plan.family} checkpoints (text and vision) are not loaded: import-hf reads the text decoder "
                      f"of their config; load a {plan.family}_text checkpoint (the language model alone)")
    naming = NAMINGS[plan.family]
    prefix = _prefix(naming, available)
    if name == "embed.weight":
        return Source((f"{prefix}{naming.embed}.weight",))
    if name.startswith("final_norm."):
        return Source((f"{prefix}{naming.final_norm}.{name.split('.', 1)[1]}",))
    if name == "lm_head.weight":
        return Source(("lm_head.weight",))
    m = _LAYER.match(name)
    subs = plan.sublayers
    if not m or int(m.group(1)) >= len(subs):
        raise HFError(f"runtime parameter '{name}' has no Hugging Face counterpart for {plan.family}")
    sub: SubLayerMap = subs[int(m.group(1))]
    part, rest = m.group(2), m.group(3)
    base = f"{prefix}{naming.layers}.{sub.hf_layer}."
    if part == "norm":
        return Source((f"{base}{naming.mixer_norm if sub.role == 'mixer' else naming.ffn_norm}.{rest}",))
    if part == "post_norm":
        post = naming.mixer_post_norm if sub.role == "mixer" else naming.ffn_post_norm
        if not post:
            raise HFError(f"runtime parameter '{name}': {plan.family} has no norm on a sub-layer's output")
        return Source((f"{base}{post}.{rest}",))
    facet = hf_facet(sub.kind)
    if plan.family not in facet.modules:
        raise HFError(f"runtime parameter '{name}': {plan.family} has no {sub.kind} layers")
    src = facet.source(rest, Site(plan.family, base, available, experts.get(sub.index, 0), fused, plan.hf))
    if src is None:
        raise HFError(f"runtime parameter '{name}' has no Hugging Face counterpart for {plan.family}")
    return src


def expert_counts(ir_model) -> dict[int, int]:
    """Sub-layer index -> number of experts, for the sub-layers whose kind splits experts over expert
    parallelism (its `split` facet's `ep` says how many there are)."""
    from ltmdsl.kinds import kind_of

    out = {}
    for layer in ir_model.layers:
        split = dict(kind_of(layer.mixer).split(layer.mixer, ir_model.d_model).ep)
        if "experts" in split:
            out[layer.index] = split["experts"]
    return out


def gather(sources: dict[str, Source], read, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Runtime state dict from checkpoint tensors: `read(name)` returns one tensor (or raises KeyError).

    Checks every result against `shapes` and names the checkpoint tensor(s) in each error.
    """
    import torch

    out = {}
    for target, src in sources.items():
        try:
            parts = [read(n) for n in src.names]
        except KeyError as e:
            raise HFError(f"missing tensor {e.args[0]} (for runtime parameter {target})") from None
        if src.op == "stack":
            shapes_seen = {tuple(p.shape) for p in parts}
            if len(shapes_seen) != 1:
                raise HFError(f"experts of {src.names[0].replace('.0.', '.*.')} differ in shape: {sorted(shapes_seen)}")
            tensor = torch.stack(parts, 0)
        elif src.op in ("first_half", "second_half"):
            fused = parts[0]
            if fused.dim() != 3 or fused.shape[1] % 2:
                raise HFError(f"tensor {src.names[0]} has shape {list(fused.shape)}, "
                              "expected [experts, 2 * d_ff, d_model]")
            half = fused.shape[1] // 2
            tensor = fused[:, :half] if src.op == "first_half" else fused[:, half:]
        elif src.op == "plus_one":  # a zero-centred (1 + w) norm weight as a plain one
            tensor = 1 + parts[0]
        elif src.op in ("even", "odd", "even_t", "odd_t"):  # one of the two interleaved halves of the last dim
            fused = parts[0]
            if fused.dim() < 2 or fused.shape[-1] % 2:
                raise HFError(f"tensor {src.names[0]} has shape {list(fused.shape)}, expected an even last dim "
                              "(gate and up interleaved)")
            tensor = fused[..., 0::2] if src.op.startswith("even") else fused[..., 1::2]
            tensor = tensor.transpose(-1, -2) if src.op.endswith("_t") else tensor
        elif src.op in ("first_half_t", "second_half_t"):  # halves of the last dim, transposed
            fused = parts[0]
            if fused.dim() != 3 or fused.shape[-1] % 2:
                raise HFError(f"tensor {src.names[0]} has shape {list(fused.shape)}, "
                              "expected [experts, d_model, 2 * d_ff]")
            half = fused.shape[-1] // 2
            tensor = (fused[..., :half] if src.op == "first_half_t" else fused[..., half:]).transpose(-1, -2)
        elif src.op == "rope_pairs":  # per head of D rows: (0, 1, 2, 3, ...) -> (0, 2, ..., 1, 3, ...)
            rows, D = parts[0].shape[0], src.group
            if rows % D:
                raise HFError(f"tensor {src.names[0]} has {rows} rows, not a whole number of heads of {D}")
            tensor = parts[0].reshape(rows // D, D // 2, 2, *parts[0].shape[1:]).transpose(1, 2).reshape(parts[0].shape)
        elif src.op == "transpose":
            if parts[0].dim() < 2:
                raise HFError(f"tensor {src.names[0]} has shape {list(parts[0].shape)}, expected a matrix")
            tensor = parts[0].transpose(-1, -2)
        else:
            tensor = parts[0]
        want = tuple(shapes[target])
        if tuple(tensor.shape) != want:
            what = src.names[0] if len(src.names) == 1 else f"{src.names[0].replace('.0.', '.*.')} (stacked)"
            raise HFError(f"tensor {what} has shape {list(tensor.shape)}, expected {list(want)} "
                          f"(runtime parameter {target})")
        out[target] = tensor
    return out


def to_hf(plan: Plan, state: dict, experts: dict[int, int], *, fused: bool = False) -> dict:
    """HF tensors from a runtime state dict (the inverse of `gather`): per-expert layout unless `fused`."""
    import torch

    out: dict = {}
    halves: dict[str, dict[str, object]] = {}
    for name, tensor in state.items():
        src = source_of(plan, name, experts, None, fused=fused)
        if src.op == "copy":
            out[src.names[0]] = tensor
        elif src.op == "plus_one":
            out[src.names[0]] = tensor - 1
        elif src.op == "stack":
            for j, hf_name in enumerate(src.names):
                out[hf_name] = tensor[j]
        elif src.op == "transpose":
            out[src.names[0]] = tensor.transpose(-1, -2)
        elif src.op == "rope_pairs":  # halves back to interleaved pairs, per head
            rows, D = tensor.shape[0], src.group
            out[src.names[0]] = tensor.reshape(rows // D, 2, D // 2, *tensor.shape[1:]).transpose(1, 2).reshape(
                tensor.shape)
        else:  # one part of a fused tensor: assembled once both are there
            halves.setdefault(src.names[0], {})[src.op] = tensor.transpose(-1, -2) if src.op.endswith("_t") else tensor
    for hf_name, parts in halves.items():
        if "first_half" in parts:
            out[hf_name] = torch.cat([parts["first_half"], parts["second_half"]], dim=1)
        elif "first_half_t" in parts:  # already transposed back to [E, d, F]
            out[hf_name] = torch.cat([parts["first_half_t"], parts["second_half_t"]], dim=-1)
        else:  # interleaved along the last dim: even, odd, even, ...
            even, odd = (parts.get(op, parts.get(f"{op}_t")) for op in ("even", "odd"))
            out[hf_name] = torch.stack([even, odd], dim=-1).flatten(-2)
    return {k: v.contiguous() for k, v in out.items()}
