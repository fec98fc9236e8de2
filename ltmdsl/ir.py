"""The intermediate representation: the single source of truth for every back end.

A spec file is parsed and resolved into one `ModelIR` per `model` block and one `BudgetIR` per `budget`
block. Every dimension is a plain int, every dtype a `Dtype`, and every object remembers where in the
source it came from (`SourcePos`). The memory model, the PyTorch runtime and the Triton code generator
all read these frozen dataclasses and nothing else, so predicted bytes equal allocated bytes.

The stack is flat: one `SubLayer` per mixer or feed-forward network, each with its own pre-norm and
residual (x = x + f(norm(x))). A Jamba "decoder layer" is therefore two sub-layers: a mixer and an FFN.

Axis names: H, Hkv query and key/value heads, D, Dv query/key and value head dims, W window, N SSM state,
P SSM head dim, E, k experts and experts per token, C chunk, V vocabulary, d model width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SourcePos:
    """Where a construct starts in its spec file (1-based line and column)."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Dtype:
    """A storage dtype: its spec name (`bf16`, `fp8_e4m3`, ...) and its size in bytes."""

    name: str
    bytes: int

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class NormConfig:
    """Normalisation before a sub-layer (and at the end of the stack): rmsnorm or layernorm.

    zero_centred (rmsnorm only; Gemma, Qwen3-Next): the learned weight w is stored centred on zero and the
    norm scales by (1 + w), so a zero-initialised weight is the identity scale. Same parameter count.
    """

    kind: str  # "rmsnorm" | "layernorm"
    eps: float
    zero_centred: bool = False

    @property
    def params_per_channel(self) -> int:
        """Learned scalars per channel: a weight, plus a bias for layernorm."""
        return 2 if self.kind == "layernorm" else 1


# ---------------------------------------------------------------------------------------------
# Mixers and feed-forward networks. Each kind's config lives with its facets in ltmdsl/kinds/<kind>.py;
# `kind` is the registry key shared by every back end.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerConfig:
    """Base class of every layer kind's frozen IR config (ltmdsl/kinds/<kind>.py).

    A subclass declares its fields and, last, `kind: str = field(default="<name>", init=False)`: the
    registry key (`ltmdsl.kinds.REGISTRY`) every back end dispatches on. The IR itself knows no kind.
    """


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for contexts longer than the one a model was pre-trained on.

    With the plain frequencies inv_freq_i = 1 / theta^(2i/R) (R the rotated channels) and wavelengths
    2*pi / inv_freq_i, `kind` says how they change (transformers' `rope_type`, modeling_rope_utils):

    "llama3" (Llama 3.1): wavelengths shorter than original_context / high_freq_factor keep their frequency,
        those longer than original_context / low_freq_factor have it divided by `factor`, and those in between
        are interpolated smoothly. cos and sin are not rescaled.
    "linear" (position interpolation, Chen et al. 2023; Gemma-3's global layers): every frequency is divided by
        `factor`. cos and sin are not rescaled.
    "dynamic" (dynamic NTK scaling, transformers' `rope_type: dynamic`): when a call reaches L > original_context
        tokens the base becomes theta * (factor * L / original_context - (factor - 1))^(R / (R - 2)); below the
        original context RoPE is plain. cos and sin are not rescaled.
    "yarn" (YaRN, Peng et al. 2023; DeepSeek-V2/V3, gpt-oss, Qwen): with the correction range [lo, hi] of the
        dimensions that turn beta_fast and beta_slow times over original_context tokens (floored / ceiled when
        `truncate`), frequency i is extrapolated (kept) below lo, interpolated (divided by `factor`) above hi and
        blended linearly in between; cos and sin are multiplied by the attention factor: `attention_factor` if
        given, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are given (DeepSeek), else
        mscale(factor, 1), where mscale(s, m) = 0.1 * m * ln(s) + 1 for s > 1 and 1 otherwise.

    "longrope" (LongRoPE, Ding et al. 2024; Phi-3): frequency i is divided by short_factor[i] while a call stays
        within original_context tokens and by long_factor[i] beyond; cos and sin are multiplied by
        `attention_factor` if given, else sqrt(1 + ln(factor) / ln(original_context)) (1 for factor <= 1).

    Only the rotation angles (and for yarn and longrope the cos/sin magnitude) change: no parameters, no cache
    bytes. Fields a kind does not use are None.
    """

    kind: str  # "llama3" | "linear" | "dynamic" | "yarn" | "longrope"
    factor: float  # >= 1: the context is extended `factor` times
    low_freq_factor: float | None = None  # llama3: > 0
    high_freq_factor: float | None = None  # llama3: >= low_freq_factor (equal: a step, Llama-4)
    original_context: int | None = None  # llama3, dynamic, yarn: the pre-training context
    beta_fast: float | None = None  # yarn: rotations bounding the extrapolated band (transformers' default 32)
    beta_slow: float | None = None  # yarn: rotations bounding the interpolated band (default 1)
    mscale: float | None = None  # yarn: DeepSeek's mscale
    mscale_all_dim: float | None = None  # yarn: DeepSeek's mscale_all_dim
    attention_factor: float | None = None  # yarn, longrope: explicit cos/sin factor, overriding the formula
    truncate: bool | None = None  # yarn: round the correction range to whole dimensions (default true)
    short_factor: tuple[float, ...] | None = None  # longrope: R/2 divisors of the frequencies within the context
    long_factor: tuple[float, ...] | None = None  # longrope: R/2 divisors beyond original_context


@dataclass(frozen=True)
class Residual:
    """How a sub-layer's residual connection combines the stream with its branch (no parameters):

        x' = skip_scale * s + branch_scale * residual_scale * post_norm(f(norm(x)))

    with s = x (`skip = "input"`, the pre-norm residual) or s = norm(x) (`skip = "normed"`: the residual is
    taken after the pre-norm, as MiniMax-01's decoder layer does). The default is the plain x + branch.
    MiniMax-01 scales s by alpha = (2 * num_hidden_layers)^(1/4) and the branch by beta = 1.

    Two settings say how the sub-layer reads and writes the stream (Zamba, Glorioso et al. 2024, eq. 6):
    `input = "concat_embed"`: the pre-norm and the mixer read cat[x, e] (2 d_model wide; e the scaled embedding
    output), not x. `into = "next_input"`: the branch is not added to the residual stream (x' = x) but to the
    next sub-layer's input before that sub-layer's pre-norm, its residual still carrying x (transformers'
    Zamba2 `transformer_hidden_states`, added to the following Mamba layer's input only).
    """

    skip: str = "input"  # "input" | "normed"
    skip_scale: float = 1.0
    branch_scale: float = 1.0
    input: str = "stream"  # "stream" | "concat_embed"
    into: str = "residual"  # "residual" | "next_input"

    @property
    def width(self) -> int:
        """How many d_model-wide tensors the pre-norm and the mixer read: 2 for cat[x, e], else 1."""
        return 2 if self.input == "concat_embed" else 1

    @property
    def plain(self) -> bool:
        return self == Residual()


@dataclass(frozen=True)
class SubLayer:
    """One residual sub-layer of the stack: x = x + mixer(norm(x)), or with a post-norm (Gemma-3's sandwich
    norms) x = x + post_norm(mixer(norm(x))); the model's residual_scale multiplies what is added, and
    `residual` may scale either side and take the residual after the norm (MiniMax-01; see `Residual`).

    `definition` is the spec's layer name (`attn`, `ssm`); `tie_group` names the shared block whose
    weights this sub-layer reuses (Zamba-style), None when it owns its weights. `params` counts the
    mixer and its norms; sub-layers of one tie group with the same `tie_slot` share those parameters, except
    `use_params` of them (per-use adapters and projections, `Kind.per_use`), which every use owns.
    """

    index: int
    definition: str
    norm: NormConfig
    mixer: LayerConfig
    params: int
    pos: SourcePos
    tie_group: str | None = None
    tie_slot: int | None = None
    post_norm: NormConfig | None = None
    residual: Residual = Residual()
    use_params: int = 0  # of `params`, those every use owns even when tied (per-use adapters)

    @property
    def kind(self) -> str:
        return self.mixer.kind

    @property
    def is_ffn(self) -> bool:
        """A feed-forward sub-layer (mlp, moe) rather than a sequence mixer, as its registered kind says."""
        from ltmdsl.kinds import kind_of  # the registry imports this module

        return kind_of(self.mixer).is_ffn


@dataclass(frozen=True)
class MTPConfig:
    """DeepSeek-V3's multi-token prediction (DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024, section 2.2):
    `depth` sequential modules; module k (1-based) predicts token i + k + 1 from position i:
        h'_i = M_k [norm_h(h_i) ; norm_e(embed(t_{i+k}))]         M_k: a [d, 2d] linear, no bias
        h''  = block_k(h')                                          one transformer block (mixer, FFN), causal
        logits_i = head(norm_o(h''_i))                               the main model's (shared) head
    with h the main model's final hidden states (after its final norm) for k = 1 and module k-1's h'' after.
    Each module owns its norms (norm_h, norm_e, norm_o: the model's norm), M_k and its block; the embedding
    and the head are the main model's. Its parameters are counted apart from the main model's total
    (`ModelIR.params_mtp`), as transformers (whose DeepSeek-V3 has no MTP module) counts the total."""

    depth: int
    block: tuple[SubLayer, ...]  # one module's block: the mixer then the FFN sub-layer, as in the stack
    norm: NormConfig
    pos: SourcePos

    def params(self, d_model: int) -> int:
        """Parameters of all `depth` modules: per module 3 norms, M_k (2d * d) and the block."""
        one = 3 * self.norm.params_per_channel * d_model + 2 * d_model * d_model + sum(x.params for x in self.block)
        return self.depth * one


@dataclass(frozen=True)
class ModelIR:
    """A resolved model: embedding, the flat stack of sub-layers, the final norm and the output head.

    Model-level scalars (none adds a parameter), in the order they act:
        h = embed(ids) * embed_scale            Gemma: sqrt(d_model); muP embedding multipliers (Granite)
        h = h + residual_scale * branch         every sub-layer's output (Granite's residual_multiplier)
        z = head(final_norm(h)) * logit_scale   Granite: 1 / logits_scaling; Falcon-H1: lm_head_multiplier
        z = logit_cap * tanh(z / logit_cap)     final-logit soft cap (Gemma-2, RecurrentGemma); none: no cap
    """

    name: str
    vocab: int  # V
    d_model: int  # d
    dtype: Dtype
    final_norm: NormConfig
    tie_embeddings: bool
    layers: tuple[SubLayer, ...]
    pos: SourcePos
    source_hash: str  # sha256 of the source text(s) the model came from
    source_text: str = ""  # the spec text this model came from (for self-describing checkpoints)
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    logit_cap: float | None = None
    mtp: MTPConfig | None = None  # multi-token-prediction modules (DeepSeek-V3); outside params_total

    @property
    def params_mtp(self) -> int:
        """Parameters of the multi-token-prediction modules (0 without): not part of `params_total`."""
        return 0 if self.mtp is None else self.mtp.params(self.d_model)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.d_model

    @property
    def head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab * self.d_model

    @property
    def final_norm_params(self) -> int:
        return self.final_norm.params_per_channel * self.d_model

    def unique_layers(self) -> tuple[SubLayer, ...]:
        """Sub-layers that own parameters: every untied one and the first of each tie slot."""
        seen: set[tuple[str, int]] = set()
        out = []
        for layer in self.layers:
            if layer.tie_group is not None:
                key = (layer.tie_group, layer.tie_slot or 0)
                if key in seen:
                    continue
                seen.add(key)
            out.append(layer)
        return tuple(out)

    def per_use_params(self) -> int:
        """Parameters that tied sub-layers own per use (their adapters), beyond the owner of each tie slot."""
        owners = {id(layer) for layer in self.unique_layers()}
        return sum(layer.use_params for layer in self.layers if id(layer) not in owners)

    @property
    def params_total(self) -> int:
        """Every learned scalar, counted once (tied weights once, per-use adapters once per use), as
        `transformers` counts them."""
        return (
            self.embedding_params
            + self.head_params
            + self.final_norm_params
            + sum(layer.params for layer in self.unique_layers())
            + self.per_use_params()
        )

    @property
    def params_active(self) -> int:
        """Parameters one token touches: MoE layers count the router and top-k experts only."""
        from ltmdsl.kinds import kind_of  # the registry imports this module

        return self.params_total - sum(
            kind_of(layer.mixer).inactive(layer.mixer, self.d_model) for layer in self.unique_layers()
        )

    def layers_of(self, kind: str) -> tuple[SubLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kind == kind)

    def to_json(self) -> dict[str, Any]:
        return _jsonable(self)


# ---------------------------------------------------------------------------------------------
# Budgets and hardware.
# ---------------------------------------------------------------------------------------------

    @property
    def structure_hash(self) -> str:
        """sha256 of the model itself: its resolved IR as JSON without source positions, text or hash. Specs
        that differ only in comments, layout, budgets or other models resolve to the same hash, so one's
        checkpoints load into the other (`ltmdsl train --resume` / `--init`, distributed checkpoints)."""
        text = json.dumps(_without_source(_jsonable(self)), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def is_model_of(self, source_hash: str | None, structure_hash: str | None = None) -> bool:
        """Whether weights recorded with these hashes are this model's: the same spec text, or a spec that
        resolves to the same model (`structure_hash`; checkpoints written before it carry only the first)."""
        return source_hash == self.source_hash or (structure_hash is not None
                                                   and structure_hash == self.structure_hash)


@dataclass(frozen=True)
class GpuSpec:
    """An accelerator: usable memory in bytes, dense bf16 FLOP/s and HBM bandwidth in bytes/s."""

    name: str
    memory_bytes: int
    bf16_flops: float
    hbm_bytes_per_s: float
    pos: SourcePos | None = None


#: How context parallelism splits a sequence (a budget's `cp_split`; ltmdsl.distributed.context_parallel):
#: 2*cp chunks, rank r holding chunks r and 2cp-1-r, or one contiguous block per rank.
CP_SPLITS = ("balanced", "contiguous")


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of parallelism. dp = gpus / (tp*pp*cp) unless given.

    MoE layers fold their own layout over the same ranks (Megatron-Core's MoE parallel folding): the tp*cp*dp
    ranks of a pipeline stage are etp x ep x edp for the routed experts, etp ranks splitting each expert's
    width, ep ranks holding different experts and edp = tp*cp*dp / (etp*ep) holding the same ones. `etp` None
    means etp = tp (Megatron's default, `expert_tp`), so a plan that changes tp keeps experts split like it.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    zero: int = 0  # ZeRO stage 0..3
    distributed_optimizer: bool = False  # Megatron's, shards the optimizer over dp (like ZeRO-1)
    sequence_parallel: bool = False
    microbatches: int = 1  # m, pipeline micro-batches per step
    interleave: int = 1  # virtual pipeline stages per GPU
    cp_split: str = "balanced"  # cp token split: 2*cp chunks, rank r holds r and 2cp-1-r | "contiguous"
    etp: int | None = None  # expert tensor parallel degree; None: tp

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        """The ranks splitting each routed expert's width: etp, tp when not given."""
        return self.tp if self.etp is None else self.etp

    @property
    def edp(self) -> int:
        """The expert-data-parallel ranks, holding the same experts: tp*cp*dp / (etp*ep) (at least 1; the plan
        checks refuse a plan where etp*ep does not divide tp*cp*dp)."""
        return max(1, self.tp * self.cp * self.dp // (self.expert_tp * self.ep))


@dataclass(frozen=True)
class LimitIR:
    """`require QUANTITY <= BOUND`: QUANTITY is one name or a sum of names of the same measure.

    Bytes: memory components (one replica), `total` or `per_gpu` (the most loaded GPU); BOUND has a byte unit.
    FLOPs: `decode_flops`, `mixing_flops` (sequence mixing per decoded token), `prefill_flops`; BOUND is a
    count. `component` is the quantity as written ("kv_cache + recurrent_state"), `parts` its names.
    """

    component: str
    bound: int  # bytes or FLOPs, inclusive (`< X` is stored as X - 1)
    pos: SourcePos
    parts: tuple[str, ...] = ()
    measure: str = "bytes"  # bytes | flops

    def __post_init__(self) -> None:
        if not self.parts:
            object.__setattr__(self, "parts", (self.component,))


@dataclass(frozen=True)
class BudgetIR:
    """Where and how a model runs, and the limits its memory must respect."""

    name: str
    model: str
    mode: str  # "inference" | "training"
    context: int  # T
    batch: int  # B
    chunk: int  # C: prefill chunk (inference) or micro-batch sequence chunk for the loss (training)
    gpu: GpuSpec
    gpus: int
    parallel: ParallelPlan
    weight_dtype: Dtype
    kv_dtype: Dtype
    state_dtype: Dtype
    grad_dtype: Dtype
    optimizer: str  # "adamw" | "sgd" | "none"
    optimizer_bytes_per_param: int  # 12 for AdamW fp32 master + m + v
    recompute: str  # "none" | "selective" | "full"
    flash_attention: bool
    chunked_loss: bool
    conv_taps: str  # "full" (keep K taps, state-spaces/mamba) | "minus_one" (K-1, vLLM)
    limits: tuple[LimitIR, ...]
    pos: SourcePos

    def to_json(self) -> dict[str, Any]:
        return _jsonable(self)


@dataclass(frozen=True)
class SpecIR:
    """Everything one spec file (and the files it `use`s) defines after resolution."""

    models: tuple[ModelIR, ...]
    budgets: tuple[BudgetIR, ...]
    gpus: tuple[GpuSpec, ...]
    file: str

    def model(self, name: str | None = None) -> ModelIR:
        """The named model, or the only/last model in the file when no name is given."""
        if name is None:
            return self.models[-1]
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def budgets_for(self, model: str) -> tuple[BudgetIR, ...]:
        return tuple(b for b in self.budgets if b.model == model)

    def to_json(self) -> dict[str, Any]:
        return _jsonable(self)


def _without_source(obj: Any) -> Any:
    """A `_jsonable` value without what only says where it was written (positions, spec text and hash)."""
    if isinstance(obj, dict):
        return {k: _without_source(v) for k, v in obj.items() if k not in ("pos", "source_hash", "source_text")}
    if isinstance(obj, list):
        return [_without_source(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    """Frozen dataclasses to plain JSON values, with `kind` fields and derived totals included."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, ModelIR):
            out.pop("source_text", None)
            out["params_total"] = obj.params_total
            out["params_active"] = obj.params_active
            if obj.mtp is None:  # the JSON of a model without MTP modules stays as it was
                out.pop("mtp", None)
            else:
                out["params_mtp"] = obj.params_mtp
        if isinstance(obj, SubLayer):
            out["kind"] = obj.kind
        if isinstance(obj, RopeScaling):  # only the fields its kind uses (the others are None)
            out = {k: v for k, v in out.items() if v is not None}
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Stable JSON text of any IR object."""
    return json.dumps(_jsonable(obj), indent=2, sort_keys=True)
