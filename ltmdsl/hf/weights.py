"""Tensor names: Hugging Face checkpoints <-> the runtime's parameters (docs/CONTRACTS.md), both expert layouts.

HF decoder layer i holds a mixer and usually an FFN, each with its own pre-norm; the runtime's flat stack has
one sub-layer per mixer or FFN (`spec.Plan.sublayers` says which HF layer and part each one is). So for
Llama, HF `model.layers.{i}.self_attn.q_proj.weight` is runtime `layers.{2i}.mixer.q_proj.weight` and
`post_attention_layernorm` is the norm of runtime layer 2i+1; for Mamba, HF layer i is runtime layer i.

Mixture-of-experts weights come in two layouts, and we read both:
- per expert, as published checkpoints and `save_pretrained` (by default) store them: Mixtral
  `block_sparse_moe.experts.{j}.w1/w3/w2.weight` (gate/up/down) and `block_sparse_moe.gate.weight`,
  Jamba `feed_forward.experts.{j}.gate_proj/up_proj/down_proj.weight` and `feed_forward.router.weight`;
- fused, as transformers 5 keeps them in memory and writes them with `save_pretrained(...,
  save_original_format=False)`: `experts.gate_up_proj [E, 2F, d]` (gate rows first, then up) and
  `experts.down_proj [E, d, F]`, with Mixtral's block renamed `mlp`.
The runtime stores `experts.gate_proj/up_proj [E, F, d]` and `experts.down_proj [E, d, F]`, so per-expert
tensors are stacked and the fused gate_up is split in halves. Export writes the per-expert layout by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ltmdsl.hf import HFError
from ltmdsl.hf.spec import Plan, SubLayerMap


@dataclass(frozen=True)
class Naming:
    """Where a family keeps its tensors; the first of several candidates is what export writes."""

    prefixes: tuple[str, ...]  # "model." or "backbone."
    embed: str
    final_norm: str
    mixer_module: dict  # kind -> module name inside the HF layer
    mixer_norm: str
    ffn_modules: tuple[str, ...]  # FFN / MoE block names (Mixtral: block_sparse_moe, then mlp)
    ffn_norm: str
    router: str  # router module inside the MoE block
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down


_TRANSFORMER = dict(prefixes=("model.",), embed="embed_tokens", final_norm="norm",
                    mixer_module={"attention": "self_attn"}, mixer_norm="input_layernorm",
                    ffn_modules=("mlp",), ffn_norm="post_attention_layernorm", router="gate")
NAMINGS = {
    "llama": Naming(**_TRANSFORMER),
    "mistral": Naming(**_TRANSFORMER),
    "qwen2": Naming(**_TRANSFORMER),
    "qwen3": Naming(**_TRANSFORMER),
    "mixtral": Naming(**{**_TRANSFORMER, "ffn_modules": ("block_sparse_moe", "mlp")},
                      expert_names=("w1", "w3", "w2")),
    "jamba": Naming(prefixes=("model.",), embed="embed_tokens", final_norm="final_layernorm",
                    mixer_module={"attention": "self_attn", "mamba": "mamba"}, mixer_norm="input_layernorm",
                    ffn_modules=("feed_forward",), ffn_norm="pre_ff_layernorm", router="router"),
    "bamba": Naming(prefixes=("model.",), embed="embed_tokens", final_norm="final_layernorm",
                    mixer_module={"attention": "self_attn", "mamba2": "mamba"}, mixer_norm="input_layernorm",
                    ffn_modules=("feed_forward",), ffn_norm="pre_ff_layernorm", router=""),
    "mamba": Naming(prefixes=("backbone.",), embed="embeddings", final_norm="norm_f",
                    mixer_module={"mamba": "mixer"}, mixer_norm="norm", ffn_modules=(), ffn_norm="", router=""),
    "mamba2": Naming(prefixes=("backbone.",), embed="embeddings", final_norm="norm_f",
                     mixer_module={"mamba2": "mixer"}, mixer_norm="norm", ffn_modules=(), ffn_norm="", router=""),
    "nemotron_h": Naming(prefixes=("backbone.", "model."), embed="embeddings", final_norm="norm_f",
                         mixer_module={"attention": "mixer", "mamba2": "mixer"}, mixer_norm="norm",
                         ffn_modules=("mixer",), ffn_norm="norm", router=""),
}


@dataclass(frozen=True)
class Source:
    """How one runtime tensor is made from checkpoint tensors.

    op "copy": the one tensor as is; "stack": per-expert tensors stacked on a new dim 0; "first_half" /
    "second_half": the halves of a fused tensor along dim 1 (gate, up).
    """

    names: tuple[str, ...]
    op: str = "copy"


_LAYER = re.compile(r"^layers\.(\d+)\.(norm|mixer)\.(.+)$")


def _prefix(naming: Naming, available: set[str] | None) -> str:
    """The checkpoint's prefix: the candidate whose embedding tensor exists (the first when unknown)."""
    if available is not None:
        for p in naming.prefixes:
            if f"{p}{naming.embed}.weight" in available:
                return p
    return naming.prefixes[0]


def _moe_layout(naming: Naming, base: str, available: set[str] | None) -> tuple[str, bool]:
    """(block module, fused?) of one HF layer's MoE in the checkpoint; per-expert under the first name if unknown."""
    if available is not None:
        for module in naming.ffn_modules:
            if f"{base}{module}.experts.gate_up_proj" in available:
                return module, True
            if f"{base}{module}.experts.0.{naming.expert_names[0]}.weight" in available:
                return module, False
    return naming.ffn_modules[0], False


def source_of(plan: Plan, name: str, experts: dict[int, int], available: set[str] | None = None,
              *, fused: bool | None = None) -> Source:
    """The checkpoint tensor(s) behind runtime parameter `name`.

    `experts` maps a MoE sub-layer index to its expert count; `available` (the checkpoint's tensor names)
    picks the prefix and each MoE layer's layout; `fused` forces a layout (export).
    """
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
    base = f"{prefix}layers.{sub.hf_layer}."
    if part == "norm":
        return Source((f"{base}{naming.mixer_norm if sub.role == 'mixer' else naming.ffn_norm}.{rest}",))
    if sub.role == "mixer":
        return Source((f"{base}{naming.mixer_module[sub.kind]}.{rest}",))
    if sub.kind == "mlp":
        return Source((f"{base}{naming.ffn_modules[0]}.{rest}",))
    module, is_fused = _moe_layout(naming, base, available)
    if fused is not None:
        is_fused = fused
        module = naming.ffn_modules[-1] if fused else naming.ffn_modules[0]
    block = f"{base}{module}."
    if rest.startswith("router."):
        return Source((f"{block}{naming.router}.{rest.split('.', 1)[1]}",))
    which = {"experts.gate_proj": 0, "experts.up_proj": 1, "experts.down_proj": 2}.get(rest)
    if which is None:
        raise HFError(f"runtime parameter '{name}' has no Hugging Face counterpart for {plan.family}")
    if is_fused:
        if which == 2:
            return Source((f"{block}experts.down_proj",))
        return Source((f"{block}experts.gate_up_proj",), "first_half" if which == 0 else "second_half")
    n = experts[sub.index]
    return Source(tuple(f"{block}experts.{j}.{naming.expert_names[which]}.weight" for j in range(n)), "stack")


def expert_counts(ir_model) -> dict[int, int]:
    """Sub-layer index -> number of experts, for the MoE sub-layers of a resolved model."""
    return {layer.index: layer.mixer.experts for layer in ir_model.layers if layer.kind == "moe"}


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
        elif src.op == "stack":
            for j, hf_name in enumerate(src.names):
                out[hf_name] = tensor[j]
        else:
            halves.setdefault(src.names[0], {})[src.op] = tensor
    for hf_name, parts in halves.items():
        out[hf_name] = torch.cat([parts["first_half"], parts["second_half"]], dim=1)
    return {k: v.contiguous() for k, v in out.items()}
