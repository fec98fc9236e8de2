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
from ltmdsl.hf.families import deepseek_v3
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
    "deepseek_v2": _TRANSFORMER, "deepseek_v3": _TRANSFORMER,
    "mamba2": _SSM,
    "nemotron_h": Naming(prefixes=("backbone.", "model."), embed="embeddings", final_norm="norm_f",
                         mixer_norm="norm", ffn_norm="norm"),
    "recurrent_gemma": Naming(prefixes=("model.",), embed="embed_tokens", final_norm="final_norm",
                              mixer_norm="temporal_pre_norm", ffn_norm="channel_pre_norm"),
    "lfm2": Naming(prefixes=("model.",), embed="embed_tokens", final_norm="embedding_norm",
                   mixer_norm="operator_norm", ffn_norm="ffn_norm"),
    "xlstm": Naming(prefixes=("backbone.",), embed="embeddings", final_norm="out_norm", mixer_norm="norm_mlstm",
                    ffn_norm="norm_ffn", layers="blocks"),
    "kimi_linear": _TRANSFORMER,
    **dict.fromkeys(("qwen3_5", "qwen3_5_moe"), Naming(  # published: under model.language_model, beside a vision tower
        ("model.", "model.language_model."), "embed_tokens", "norm", "input_layernorm", "post_attention_layernorm")),
    "qwen3_moe": _TRANSFORMER, "gpt_oss": _TRANSFORMER, "llama4_text": _TRANSFORMER,
    "gemma3_text": _GEMMA3,
    "granitemoehybrid": _TRANSFORMER,
    "minimax": _TRANSFORMER,
    "falcon_h1": Naming(prefixes=("model.",), embed="embed_tokens", final_norm="final_layernorm",
                        mixer_norm="input_layernorm", ffn_norm="pre_ff_layernorm"),
}
#: Families whose checkpoints hold multi-token-prediction modules ltmdsl maps (`mtp`): runtime name inside
#: `mtp.{k}.` -> the name inside HF decoder layer num_hidden_layers + k, and the copies of model-level tensors
#: that layer holds (HF name -> runtime name).
MTP_NAMINGS = {"deepseek_v3": (deepseek_v3.MTP_NAMES, deepseek_v3.MTP_COPIES)}
#: Multimodal families whose config import-hf reads (its text decoder) but whose checkpoints from_hf does not
#: (their tensors hold the vision tower and projector too, under the multimodal model's names).
TEXT_ONLY = ("gemma3", "llama4")


_LAYER = re.compile(r"^layers\.(\d+)\.(norm|post_norm|mixer)\.(.+)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")


def _prefix(naming: Naming, available: set[str] | None) -> str:
    """The checkpoint's prefix: the candidate whose embedding tensor exists (the first when unknown)."""
    if available is not None:
        for p in naming.prefixes:
            if f"{p}{naming.embed}.weight" in available:
                return p
    return naming.prefixes[0]


def source_of(plan: Plan, name: str, experts: dict[int, int], available: set[str] | None = None,
              *, fused: bool | None = None, layers: dict | None = None) -> Source:
    """The checkpoint tensor(s) behind runtime parameter `name`.

    `experts` maps a MoE sub-layer index to its expert count; `available` (the checkpoint's tensor names)
    picks the prefix and each MoE layer's layout; `fused` forces a layout (export); `layers` maps a sub-layer
    index to its IR config, for the kinds whose tensor transforms depend on its shape (`layer_configs`).
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
    mtp = _MTP.match(name)
    key = None  # the sub-layer's key in `experts` and `layers`: its index, or ("mtp", j) in an MTP block
    if mtp:
        k, inner = int(mtp.group(1)), mtp.group(2)
        subs = plan.mtp_sublayers(k)
        if not subs or plan.family not in MTP_NAMINGS:
            raise HFError(f"runtime parameter '{name}' has no Hugging Face counterpart for {plan.family}")
        own, _, tail = inner.partition(".")
        if own in MTP_NAMINGS[plan.family][0]:
            hf_name = f"{prefix}{naming.layers}.{subs[0].hf_layer}.{MTP_NAMINGS[plan.family][0][own]}.{tail}"
            return Source((hf_name,), "swap_halves" if own == "proj" else "copy")
        m = _LAYER.match(inner)
        if m:
            key = ("mtp", int(m.group(1)))
    else:
        m = _LAYER.match(name)
        subs = plan.sublayers
    if not m or int(m.group(1)) >= len(subs):
        raise HFError(f"runtime parameter '{name}' has no Hugging Face counterpart for {plan.family}")
    sub: SubLayerMap = subs[int(m.group(1))]
    key = sub.index if key is None else key
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
    layer = (layers or {}).get(key)
    src = facet.source(rest, Site(plan.family, base, available, experts.get(key, 0), fused, layer=layer,
                                  hf=plan.hf))
    if src is None:
        raise HFError(f"runtime parameter '{name}' has no Hugging Face counterpart for {plan.family}")
    return scaled(src, plan.hf.get("tensor_scales", {}))


def buffers_of(plan: Plan, ir_model) -> dict:
    """Checkpoint name -> value (a float32 tensor) of every non-learned tensor transformers saves with the weights
    of this model (the kinds' `buffers` facet, e.g. MiniMax's lightning decay tables), from the config and each
    sub-layer's place in the stack; empty for families that save none."""
    from ltmdsl.runtime.kinds import layer_places

    naming = NAMINGS[plan.family]
    out = {}
    for sub, layer, place in zip(plan.sublayers, ir_model.layers, layer_places(ir_model.layers)):
        facet = hf_facet(sub.kind)
        if facet.buffers is None or plan.family not in facet.modules:
            continue
        base = f"{naming.prefixes[0]}{naming.layers}.{sub.hf_layer}."
        site = Site(plan.family, base)
        out.update({f"{base}{facet.modules[plan.family][0]}.{rest}": t
                    for rest, t in facet.buffers(layer.mixer, site, place).items()})
    return out


def _keyed_layers(ir_model):
    """(key, sub-layer) of the stack (key: its index) and of the MTP block (key: ("mtp", j)), if any."""
    yield from ((layer.index, layer) for layer in ir_model.layers)
    if ir_model.mtp is not None:
        yield from ((("mtp", j), layer) for j, layer in enumerate(ir_model.mtp.block))


def expert_counts(ir_model) -> dict:
    """Sub-layer key (`_keyed_layers`) -> number of experts, for the sub-layers whose kind splits experts over
    expert parallelism (its `split` facet's `ep` says how many there are)."""
    from ltmdsl.kinds import kind_of

    out = {}
    for key, layer in _keyed_layers(ir_model):
        split = dict(kind_of(layer.mixer).split(layer.mixer, ir_model.d_model).ep)
        if "experts" in split:
            out[key] = split["experts"]
    return out


def layer_configs(ir_model) -> dict:
    """Sub-layer key (`_keyed_layers`) -> its IR config (what `source_of` passes to the kinds as `Site.layer`)."""
    return {key: layer.mixer for key, layer in _keyed_layers(ir_model)}


def mtp_copies(plan: Plan, available: set[str] | None = None) -> dict[str, str]:
    """The copies of model-level tensors that the MTP layers of the checkpoint hold (DeepSeek-V3's embed_tokens
    and shared_head.head in each): HF name -> the runtime parameter they must equal (the embedding for a tied
    head). Empty without MTP modules."""
    if plan.mtp is None or plan.family not in MTP_NAMINGS:
        return {}
    naming = NAMINGS[plan.family]
    prefix = _prefix(naming, available)
    out = {}
    for k in range(plan.mtp[0]):
        for hf_name, runtime in MTP_NAMINGS[plan.family][1].items():
            runtime = "embed.weight" if runtime == "lm_head.weight" and plan.tied else runtime
            out[f"{prefix}{naming.layers}.{len(plan.tokens) + k}.{hf_name}"] = runtime
    return out


def mtp_layers(plan: Plan) -> tuple[str, ...]:
    """The prefixes of the HF decoder layers that hold the plan's MTP modules (`model.layers.61.`)."""
    if plan.mtp is None:
        return ()
    naming = NAMINGS[plan.family]
    return tuple(f"{p}{naming.layers}.{len(plan.tokens) + k}." for p in naming.prefixes for k in range(plan.mtp[0]))


def _factors(src: Source, tensor):
    """The per-row factors of a scaled source, shaped to broadcast over `tensor` [rows, ...]."""
    import torch

    rows = sum(n for n, _ in src.scales)
    if tensor.dim() == 0 or tensor.shape[0] != rows:
        raise HFError(f"tensor {src.names[0]} has {tensor.shape[0] if tensor.dim() else 0} rows; its multipliers "
                      f"cover {rows}")
    f = torch.cat([torch.full((n,), float(m), dtype=tensor.dtype, device=tensor.device)
                   for n, m in src.scales])  # [rows]
    return f.view(-1, *([1] * (tensor.dim() - 1)))


def scaled(src: Source, scales: dict) -> Source:
    """`src` with the multipliers the plan folds into it (`Plan.hf["tensor_scales"]`: checkpoint-name suffix ->
    segments), when it is one copied tensor whose name ends with such a suffix."""
    if not scales or src.op != "copy" or len(src.names) != 1:
        return src
    for suffix, segments in scales.items():
        if src.names[0].endswith(suffix) and any(m != 1.0 for _, m in segments):
            return Source(src.names, "copy", scales=tuple((int(n), float(m)) for n, m in segments))
    return src


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
        elif src.op in ("first_half", "second_half"):  # along dim -2: [E, 2F, d] experts, [2F, d] one MLP
            fused = parts[0]
            if fused.dim() not in (2, 3) or fused.shape[-2] % 2:
                raise HFError(f"tensor {src.names[0]} has shape {list(fused.shape)}, "
                              "expected [experts, 2 * d_ff, d_model] or [2 * d_ff, d_model]")
            half = fused.shape[-2] // 2
            tensor = fused[..., :half, :] if src.op == "first_half" else fused[..., half:, :]
        elif src.op == "plus_one":  # a zero-centred (1 + w) norm weight as a plain one
            tensor = 1 + parts[0]
        elif src.op == "rows":  # row blocks of several tensors, concatenated
            for j, p in enumerate(parts):
                if p.dim() == 0 or p.shape[0] != src.part_rows(j):
                    raise HFError(f"tensor {src.names[j]} has shape {list(p.shape)}, expected {src.part_rows(j)} "
                                  f"rows (for runtime parameter {target})")
            tensor = torch.cat([parts[j][a:b] for j, a, b in src.rows], 0)
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
        elif src.op == "swap_halves":  # [.., a | b] -> [.., b | a] along the last dim
            if parts[0].dim() < 1 or parts[0].shape[-1] % 2:
                raise HFError(f"tensor {src.names[0]} has shape {list(parts[0].shape)}, expected an even last dim")
            tensor = parts[0].roll(parts[0].shape[-1] // 2, dims=-1)
        elif src.op == "transpose":
            if parts[0].dim() < 2:
                raise HFError(f"tensor {src.names[0]} has shape {list(parts[0].shape)}, expected a matrix")
            tensor = parts[0].transpose(-1, -2)
        else:
            tensor = parts[0]
        if src.scales:
            tensor = tensor * _factors(src, tensor)
        want = tuple(shapes[target])
        if tuple(tensor.shape) != want:
            what = src.names[0] if len(src.names) == 1 else f"{src.names[0].replace('.0.', '.*.')} (stacked)"
            raise HFError(f"tensor {what} has shape {list(tensor.shape)}, expected {list(want)} "
                          f"(runtime parameter {target})")
        out[target] = tensor
    return out


def to_hf(plan: Plan, state: dict, experts: dict[int, int], *, fused: bool = False,
          layers: dict | None = None) -> dict:
    """HF tensors from a runtime state dict (the inverse of `gather`): per-expert layout unless `fused`;
    `layers` as for `source_of`."""
    import torch

    out: dict = {}
    halves: dict[str, dict[str, object]] = {}
    for name, tensor in state.items():
        src = source_of(plan, name, experts, None, fused=fused, layers=layers)
        if src.op == "rows":
            parts = [tensor.new_empty((src.part_rows(j), *tensor.shape[1:])) for j in range(len(src.names))]
            offset = 0
            for j, a, b in src.rows:
                parts[j][a:b] = tensor[offset:offset + b - a]
                offset += b - a
            out.update(zip(src.names, parts))
        elif src.op == "copy":
            out[src.names[0]] = tensor / _factors(src, tensor) if src.scales else tensor
        elif src.op == "plus_one":
            out[src.names[0]] = tensor - 1
        elif src.op == "stack":
            for j, hf_name in enumerate(src.names):
                out[hf_name] = tensor[j]
        elif src.op == "transpose":
            out[src.names[0]] = tensor.transpose(-1, -2)
        elif src.op == "swap_halves":  # its own inverse
            out[src.names[0]] = tensor.roll(tensor.shape[-1] // 2, dims=-1)
        elif src.op == "rope_pairs":  # halves back to interleaved pairs, per head
            rows, D = tensor.shape[0], src.group
            out[src.names[0]] = tensor.reshape(rows // D, 2, D // 2, *tensor.shape[1:]).transpose(1, 2).reshape(
                tensor.shape)
        else:  # one part of a fused tensor: assembled once both are there
            halves.setdefault(src.names[0], {})[src.op] = tensor.transpose(-1, -2) if src.op.endswith("_t") else tensor
    for hf_name, parts in halves.items():
        if "first_half" in parts:
            out[hf_name] = torch.cat([parts["first_half"], parts["second_half"]], dim=-2)
        elif "first_half_t" in parts:  # already transposed back to [E, d, F]
            out[hf_name] = torch.cat([parts["first_half_t"], parts["second_half_t"]], dim=-1)
        else:  # interleaved along the last dim: even, odd, even, ...
            even, odd = (parts.get(op, parts.get(f"{op}_t")) for op in ("even", "odd"))
            out[hf_name] = torch.stack([even, odd], dim=-1).flatten(-2)
    for hf_name, runtime in mtp_copies(plan).items():  # the MTP layers' copies of the embedding and head
        out[hf_name] = state[runtime].clone()  # its own storage: safetensors refuses shared ones
    return {k: v.contiguous() for k, v in out.items()}
