"""Assemble per-layer formulas into per-stage, per-kind, per-component expressions.

A model may have a thousand sub-layers but only a handful of distinct configurations. Sub-layers are
grouped by (mixer config, norm); each group's formula is built once and multiplied by its count, so the
cost is independent of depth. Pipeline parallelism cuts the flat stack into `pp` contiguous stages
(the first `n mod pp` stages take one extra sub-layer); each stage is one `StageExprs`. Without
pipelining there is one stage.

Components (JSON names):
    inference  weights, kv_cache, recurrent_state, activations, logits
    training   weights, gradients, optimizer, activations, logits, temporaries (the backward's transients)
Kinds: the registered sub-layer kinds (ltmdsl.kinds.REGISTRY; every per-layer term comes from the
kind's facets) plus `embedding` and `head` (final norm and output projection) for weights; a cache term's
part gives `mamba/conv` and `mamba/ssm` style labels;
`residual` for the inference residual stream. Inference activations are not a sum over kinds: layers run
one at a time, so the component is residual + max over kinds of one sub-layer's workspace (by_kind
lists each kind's workspace). In training, full recompute adds a `working set` entry: the un-recomputed
activations of the largest checkpoint unit (`checkpoint_units`: a mixer and the FFN right after it, or a
sub-layer alone), live while that checkpoint back-propagates; the
last stage adds a `head` entry under saved_by = "eager", what the final norm keeps (as a pre-norm does).
Under ZeRO-3 the weights add a `zero-3 gathered` entry: FSDP2's root parameters (everything outside the mixers),
gathered whole for the step beside their shard, as ltmdsl.distributed shards a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ltmdsl import kinds
from ltmdsl.ir import ModelIR
from ltmdsl.memory import activations, inference, training
from ltmdsl.memory.settings import Settings
from ltmdsl.memory.symbols import Largest

INFERENCE_COMPONENTS = ("weights", "kv_cache", "recurrent_state", "activations", "logits")
TRAINING_COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "temporaries")

ZERO = sympy.Integer(0)
R = sympy.Rational


def components_for(mode: str) -> tuple[str, ...]:
    return TRAINING_COMPONENTS if mode == "training" else INFERENCE_COMPONENTS


@dataclass
class StageExprs:
    """One pipeline stage: component -> kind -> sympy expression (bytes on one GPU of the stage)."""

    index: int
    layers: range
    by_kind: dict[str, dict[str, sympy.Expr]] = field(default_factory=dict)
    combined: dict[str, sympy.Expr] = field(default_factory=dict)  # component -> total expression

    def add(self, component: str, kind: str, expr) -> None:
        parts = self.by_kind.setdefault(component, {})
        parts[kind] = parts.get(kind, ZERO) + expr


def stage_ranges(n_layers: int, pp: int) -> list[range]:
    """Contiguous sub-layer ranges of the pp stages; the first n mod pp stages take one more."""
    if pp > n_layers:
        raise ValueError(f"pipeline degree {pp} exceeds the {n_layers} sub-layers of the model")
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for i in range(pp):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def checkpoint_units(model: ModelIR, layers: range) -> list[list[int]]:
    """Full recompute's checkpoints: a mixer sub-layer and the FFN right after it (in the same stage) form one
    unit; any other sub-layer is a unit of its own (what `_groups` counts; the traced step runs these)."""
    units: list[list[int]] = []
    for i in layers:
        prev_is_mixer = i > 0 and not model.layers[i - 1].is_ffn
        if model.layers[i].is_ffn and prev_is_mixer and i - 1 in layers and units:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def _groups(model: ModelIR, layers: range, tp: int) -> tuple[dict, dict, int]:
    """(mixer, norm, post_norm) -> count; owner params per kind (dense, expert, replicated); number of
    recompute checkpoints."""
    counts: dict = {}
    params: dict[str, list[int]] = {}
    seen: set = set()
    checkpoints = 0
    for i in layers:
        layer = model.layers[i]
        key = (layer.mixer, layer.norm, layer.post_norm)
        counts[key] = counts.get(key, 0) + 1
        prev_is_mixer = i > 0 and not model.layers[i - 1].is_ffn
        if not (layer.is_ffn and prev_is_mixer and i - 1 in layers):
            checkpoints += 1
        owner = (layer.tie_group, layer.tie_slot or 0) if layer.tie_group is not None else i
        if owner in seen:  # tied to an earlier use: only its per-use parameters (adapters) are its own
            dense, replicated = training.use_split(layer, model, tp)
            acc = params.setdefault(layer.kind, [0, 0, 0])
            acc[0] += dense
            acc[2] += replicated
            continue
        seen.add(owner)
        acc = params.setdefault(layer.kind, [0, 0, 0])
        for slot, n in enumerate(training.split_params(layer, model, tp)):  # dense, expert, replicated
            acc[slot] += n
    return counts, params, checkpoints


def assemble(model: ModelIR, s: Settings) -> list[StageExprs]:
    """Every component of every pipeline stage as sympy expressions in T, B, C (module docstring)."""
    ranges = stage_ranges(len(model.layers), s.pp)
    stages = []
    for index, layers in enumerate(ranges):
        st = StageExprs(index, layers)
        first, last = index == 0, index == len(ranges) - 1
        counts, params, checkpoints = _groups(model, layers, s.tp)
        _weights(st, model, s, params, first, last)
        if s.mode == "inference":
            _inference(st, model, s, counts, last)
        else:
            _training(st, model, s, counts, checkpoints, last)
        for comp in components_for(s.mode):
            if comp not in st.combined:
                st.combined[comp] = sympy.Add(*st.by_kind.get(comp, {}).values())
        stages.append(st)
    return stages


def _weights(st: StageExprs, model: ModelIR, s: Settings, params: dict, first: bool, last: bool) -> None:
    for kind, (dense, expert, replicated) in params.items():
        for comp, expr in training.model_states(dense, expert, s, replicated).items():
            st.add(comp, kind, expr)
    if first or (last and model.tie_embeddings):  # vocab-parallel: split over tp
        for comp, expr in training.model_states(model.embedding_params, 0, s).items():
            st.add(comp, "embedding", expr)
    if last:  # the vocab-parallel head split, the final norm replicated
        for comp, expr in training.model_states(model.head_params, 0, s, model.final_norm_params).items():
            st.add(comp, "head", expr)
    if s.mode == "training" and s.parallel.zero >= 3:
        split, replicated = fsdp_root_params(model, st.layers, first, last)
        st.add("weights", "zero-3 gathered", (R(split, s.tp) + replicated) * s.weight_dtype.bytes)
    if last and model.mtp is not None:  # DeepSeek-V3's multi-token-prediction modules, held beside the head
        mtp, d = model.mtp, model.d_model
        parts = [training.split_params(x, model, s.tp) for x in mtp.block]
        expert = mtp.depth * sum(p[1] for p in parts)
        replicated = mtp.depth * (3 * mtp.norm.params_per_channel * d + sum(p[2] for p in parts))  # + its 3 norms
        for comp, expr in training.model_states(model.params_mtp - expert - replicated, expert, s, replicated).items():
            st.add(comp, "mtp", expr)


def fsdp_root_params(model: ModelIR, layers: range, first: bool, last: bool) -> tuple[int, int]:
    """Parameters ZeRO-3 keeps gathered from the forward through the backward: those outside every mixer
    (ltmdsl.distributed shards each mixer on its own and the rest as FSDP2's root, which is not resharded after
    the forward), as (tp-split: the embedding and head held by this stage, tp-replicated: the norms)."""
    d, seen, n = model.d_model, set(), 0
    for i in layers:
        layer = model.layers[i]
        owner = (layer.tie_group, layer.tie_slot or 0) if layer.tie_group is not None else i
        if owner in seen:
            continue
        seen.add(owner)
        n += layer.norm.params_per_channel * d * layer.residual.width  # concat_embed: a 2d-wide pre-norm
        if layer.post_norm is not None:
            n += layer.post_norm.params_per_channel * d
    split = model.embedding_params if first or (last and model.tie_embeddings) else 0
    if last:
        split += model.head_params
        n += model.final_norm_params
    return split, n


def _inference(st: StageExprs, model: ModelIR, s: Settings, counts: dict, last: bool) -> None:
    workspaces: dict[str, sympy.Expr] = {}
    for (mixer, _norm, _post), n in counts.items():
        kind = kinds.kind_of(mixer)
        for term in kind.cache(mixer, s):
            st.add(term.component, kind.name if term.part is None else f"{kind.name}/{term.part}", n * term.bytes)
        ws = kind.workspace(mixer, model.d_model, s)
        workspaces[kind.name] = Largest(workspaces[kind.name], ws) if kind.name in workspaces else ws
    residual = inference.residual_workspace(model, s)
    st.by_kind["activations"] = {"residual": residual, **workspaces}
    layers = residual + (Largest(*workspaces.values()) if workspaces else ZERO)
    st.combined["activations"] = Largest(layers, inference.norm_workspace(model, s))
    if last:
        st.add("logits", "head", inference.logits(model, s))


def _training(st: StageExprs, model: ModelIR, s: Settings, counts: dict, checkpoints: int,
              last: bool) -> None:
    flight = training.in_flight(st.index, s)
    if s.recompute == "full":
        st.add("activations", "checkpoints", flight * checkpoints * activations.checkpoint(model, s))
        # the largest unit's activations, live again while it back-propagates: a mixer with the FFN after it,
        # or a sub-layer alone (until this convention the largest mixer plus the largest FFN, which over-counted
        # a stack whose largest mixer has no FFN after it: ltm-100m's Mamba-2 and short convolutions)
        units = {}
        for unit in checkpoint_units(model, st.layers):
            key = tuple((model.layers[i].mixer, model.layers[i].norm, model.layers[i].post_norm) for i in unit)
            if key not in units:
                units[key] = sympy.Add(*(activations.stored(m, model, s, "none", nm, post) for m, nm, post in key))
        working = Largest(*units.values()) if units else ZERO
        st.add("activations", "working set", working)
    else:
        working = ZERO
        for (mixer, norm, post), n in counts.items():
            st.add("activations", mixer.kind,
                   flight * n * activations.stored(mixer, model, s, norm=norm, post_norm=post))
    if last and s.saved_by == "eager":
        # the final norm keeps what a sub-layer's pre-norm keeps, its output being the head's input (the
        # "fused" convention reproduces Korthikanti et al., whose count stops at the last layer)
        st.add("activations", "head", flight * activations.MicroBatch(model, s, model.final_norm).base)
    if not last and s.parallel.pp > 1 and s.saved_by == "eager":
        # torch.distributed.pipelining keeps each in-flight micro-batch's stage output (the residual stream the
        # next stage receives) until that stage sends its gradient back
        mb = activations.MicroBatch(model, s)
        st.add("activations", "stage output", flight * mb.rep(mb.a * mb.tok * mb.h))
    if last:
        st.add("logits", "head", training.loss_logits(model, s))
    d, largest, terms = model.d_model, 0, {}
    for (mixer, norm, post), _n in counts.items():
        kind = kinds.kind_of(mixer)
        largest = max(largest, kind.count(mixer, d))
        # one sub-layer back-propagating: its backward's own transients (the kind's `backward` facet), and under
        # selective recompute what that dropped of it, live again for its backward
        term = kind.backward(mixer, activations.MicroBatch(model, s, norm))
        if s.recompute == "selective":
            term += (activations.stored(mixer, model, s, "none", norm, post)
                     - activations.stored(mixer, model, s, "selective", norm, post))
        terms[(mixer, norm, post)] = term
    # a sub-layer back-propagates after every later one of its micro-batch has, whose kept activations are freed
    # by then: each configuration counts at its last place in the stage (least freed), less what follows it
    layers, later = [], ZERO
    # under full recompute a sub-layer back-propagates after the rest of its checkpoint unit (a mixer's FFN), whose
    # recomputed activations, counted in the working set, are freed by then (until this convention they were not
    # subtracted: a KDA or mLSTM unit's traced peak 11% to 19% under the prediction at d_model 64)
    rest = {}
    if s.recompute == "full":
        for unit in checkpoint_units(model, st.layers):
            for pos, i in enumerate(unit):
                rest[i] = sympy.Add(*(activations.stored(model.layers[j].mixer, model, s, "none", model.layers[j].norm,
                                                         model.layers[j].post_norm) for j in unit[pos + 1:]))
    for i in reversed(st.layers):
        layer = model.layers[i]
        key = (layer.mixer, layer.norm, layer.post_norm)
        if key in terms:
            layers.append(terms.pop(key) - later - rest.get(i, ZERO))
        if s.recompute != "full":
            later += activations.stored(layer.mixer, model, s, norm=layer.norm, post_norm=layer.post_norm)
    # the final norm back-propagating (last stage): every sub-layer's activations still live
    final = activations.MicroBatch(model, s, model.final_norm).norm_backward if last else ZERO
    temp = training.temporaries(model, s, last, largest, layers, working, final)
    st.add("temporaries", "backward", temp)
