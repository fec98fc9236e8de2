"""The built-in layer vocabulary: one registry entry per kind, the only place a kind's front end lives.

Each `LayerKind` declares its typed parameters (defaults, required ones, choices, ranges), builds its IR
config from resolved values, checks divisibility, and counts its parameters exactly as `transformers`
does. Adding a mixer means one entry here, one IR config in `ir.py`, one memory formula, one module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ltmdsl.ir import AttentionConfig, Mamba2Config, MambaConfig, MixerConfig, MLPConfig, MoEConfig, NormConfig

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu2", "relu")
ROUTINGS = ("softmax_topk_renorm", "softmax_topk", "topk_softmax")
NORM_KINDS = ("rmsnorm", "layernorm")


@dataclass(frozen=True)
class Param:
    """One typed parameter of a layer kind.

    type: "int" | "float" | "bool" | "enum" | "norm" | "rope_scaling" (a `llama3(...)` call); `nullable`
    admits `none`.
    default: a value, a callable (values so far, ModelContext) -> value, or REQUIRED.
    """

    name: str
    type: str
    default: Any = None
    required: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    min: float | None = None
    doc: str = ""


@dataclass(frozen=True)
class ModelContext:
    """What a layer's defaults may depend on: the model width and its default norm."""

    d_model: int
    norm: NormConfig


class CheckError(Exception):
    """A semantic problem with one layer definition; `param` names the parameter to point at."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class LayerKind:
    """A built-in kind: its parameters, how to build its IR config, and how many parameters it has."""

    name: str
    doc: str
    params: tuple[Param, ...]
    build: Callable[[dict[str, Any], ModelContext], MixerConfig]
    count: Callable[[Any, int], int]  # (config, d_model) -> parameters of the mixer (norm excluded)
    is_ffn: bool = False
    param_index: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_index", {p.name: p for p in self.params})


def _div(a: int, b: int, what: str, param: str) -> int:
    if b <= 0 or a % b:
        raise CheckError(f"{what}: {a} is not divisible by {b}", param)
    return a // b


# ---- attention --------------------------------------------------------------------------------


def _build_attention(v: dict[str, Any], ctx: ModelContext) -> AttentionConfig:
    heads, kv_heads = v["heads"], v["kv_heads"] if v["kv_heads"] is not None else v["heads"]
    if heads % kv_heads:
        raise CheckError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})", "kv_heads")
    head_dim = v["head_dim"]
    if head_dim is None:
        head_dim = _div(ctx.d_model, heads, "head_dim defaults to d_model / heads, but d_model", "heads")
    v_head_dim = v["v_head_dim"] if v["v_head_dim"] is not None else head_dim
    if v["rope_scaling"] is not None and v["rope_theta"] is None:
        raise CheckError("rope_scaling rescales RoPE frequencies, but rope_theta = none turns RoPE off; "
                         "give rope_theta or drop rope_scaling", "rope_scaling")
    return AttentionConfig(
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim, window=v["window"],
        rope_theta=float(v["rope_theta"]) if v["rope_theta"] is not None else None, causal=v["causal"],
        qkv_bias=v["qkv_bias"], out_bias=v["out_bias"], qk_norm=v["qk_norm"], rope_scaling=v["rope_scaling"],
        rope_dim=_rope_dim(v["rope_dim"], head_dim, v["rope_theta"]),
    )


def _rope_dim(rope_dim: int | None, head_dim: int, rope_theta: float | None) -> int | None:
    """The checked number of rotated channels per head; None for the whole head (rope_dim = head_dim included).

    RoPE rotates channel pairs (i, i + R/2), so R must be even; it cannot exceed the head, and it means nothing
    without RoPE. (The minimum of 2 is the parameter's range, checked before this.)
    """
    if rope_dim is None:
        return None
    if rope_theta is None:
        raise CheckError("rope_dim chooses how many channels RoPE rotates, but rope_theta = none turns RoPE off; "
                         "give rope_theta or drop rope_dim", "rope_dim")
    if rope_dim % 2:
        raise CheckError(f"rope_dim must be even (RoPE rotates channels in pairs), got {rope_dim}", "rope_dim")
    if rope_dim > head_dim:
        raise CheckError(f"rope_dim ({rope_dim}) cannot exceed head_dim ({head_dim})", "rope_dim")
    return None if rope_dim == head_dim else rope_dim


def _count_attention(c: AttentionConfig, d: int) -> int:
    q = d * c.heads * c.head_dim + (c.heads * c.head_dim if c.qkv_bias else 0)
    k = d * c.kv_heads * c.head_dim + (c.kv_heads * c.head_dim if c.qkv_bias else 0)
    v = d * c.kv_heads * c.v_head_dim + (c.kv_heads * c.v_head_dim if c.qkv_bias else 0)
    o = c.heads * c.v_head_dim * d + (d if c.out_bias else 0)
    return q + k + v + o + (2 * c.head_dim if c.qk_norm else 0)


ATTENTION = LayerKind(
    "attention",
    "Softmax attention: MHA, GQA (kv_heads < heads) or MQA (kv_heads = 1), global or sliding-window.",
    (
        Param("heads", "int", required=True, min=1, doc="query heads H"),
        Param("kv_heads", "int", nullable=True, min=1, doc="key/value heads Hkv (default: heads)"),
        Param("head_dim", "int", nullable=True, min=1, doc="D (default: d_model / heads)"),
        Param("v_head_dim", "int", nullable=True, min=1, doc="Dv (default: head_dim)"),
        Param("window", "int", nullable=True, min=1, doc="sliding window W in tokens (default: none = global)"),
        Param("rope_theta", "float", 10000.0, nullable=True, min=1e-9, doc="RoPE base; none disables RoPE"),
        Param("rope_scaling", "rope_scaling", None, nullable=True,
              doc="RoPE frequency scaling: llama3(factor = ..., low_freq_factor = ..., high_freq_factor = ..., "
                  "original_context = ...) (default: none = plain RoPE)"),
        Param("rope_dim", "int", nullable=True, min=2,
              doc="channels of each q/k head that RoPE rotates, the first ones; even, at most head_dim "
                  "(default: none = the whole head)"),
        Param("causal", "bool", True),
        Param("qkv_bias", "bool", False),
        Param("out_bias", "bool", False),
        Param("qk_norm", "bool", False, doc="per-head RMSNorm on q and k (Qwen3)"),
    ),
    _build_attention,
    _count_attention,
)


# ---- Mamba-1 ----------------------------------------------------------------------------------


def _build_mamba(v: dict[str, Any], ctx: ModelContext) -> MambaConfig:
    d_inner = v["expand"] * ctx.d_model
    dt_rank = v["dt_rank"] if v["dt_rank"] is not None else -(-ctx.d_model // 16)
    return MambaConfig(
        d_state=v["d_state"], d_conv=v["d_conv"], expand=v["expand"], d_inner=d_inner, dt_rank=dt_rank,
        conv_bias=v["conv_bias"], proj_bias=v["proj_bias"], inner_norms=v["inner_norms"],
    )


def _count_mamba(c: MambaConfig, d: int) -> int:
    di, n, r = c.d_inner, c.d_state, c.dt_rank
    in_proj = d * 2 * di + (2 * di if c.proj_bias else 0)
    conv = di * c.d_conv + (di if c.conv_bias else 0)
    x_proj = di * (r + 2 * n)
    dt_proj = r * di + di
    out_proj = di * d + (d if c.proj_bias else 0)
    norms = (r + 2 * n) if c.inner_norms else 0
    return in_proj + conv + x_proj + dt_proj + di * n + di + out_proj + norms


MAMBA = LayerKind(
    "mamba",
    "Mamba-1 selective state-space layer (as in Mamba and Jamba).",
    (
        Param("d_state", "int", 16, min=1, doc="SSM state size N"),
        Param("d_conv", "int", 4, min=1, doc="causal conv taps K"),
        Param("expand", "int", 2, min=1, doc="d_inner = expand * d_model"),
        Param("dt_rank", "int", nullable=True, min=1, doc="rank of the dt projection (default: ceil(d_model / 16))"),
        Param("conv_bias", "bool", True),
        Param("proj_bias", "bool", False),
        Param("inner_norms", "bool", False, doc="Jamba's RMSNorms on dt, B and C"),
    ),
    _build_mamba,
    _count_mamba,
)


# ---- Mamba-2 ----------------------------------------------------------------------------------


def _build_mamba2(v: dict[str, Any], ctx: ModelContext) -> Mamba2Config:
    if v["heads"] is not None:  # Nemotron-H style: heads * head_dim need not be a multiple of d_model
        heads, d_inner = v["heads"], v["heads"] * v["head_dim"]
    else:
        d_inner = v["expand"] * ctx.d_model
        heads = _div(d_inner, v["head_dim"], f"the inner width expand * d_model = {d_inner}", "head_dim")
    if heads % v["n_groups"]:
        raise CheckError(f"SSM heads ({heads} = d_inner / head_dim) must be a multiple of n_groups ({v['n_groups']})",
                         "n_groups")
    return Mamba2Config(
        d_state=v["d_state"], head_dim=v["head_dim"], heads=heads, n_groups=v["n_groups"], expand=v["expand"],
        d_inner=d_inner, d_conv=v["d_conv"], chunk=v["chunk"], conv_bias=v["conv_bias"], proj_bias=v["proj_bias"],
    )


def _count_mamba2(c: Mamba2Config, d: int) -> int:
    proj_out = 2 * c.d_inner + 2 * c.n_groups * c.d_state + c.heads
    in_proj = d * proj_out + (proj_out if c.proj_bias else 0)
    conv = c.conv_dim * c.d_conv + (c.conv_dim if c.conv_bias else 0)
    out_proj = c.d_inner * d + (d if c.proj_bias else 0)
    return in_proj + conv + 3 * c.heads + c.d_inner + out_proj


MAMBA2 = LayerKind(
    "mamba2",
    "Mamba-2 state-space duality (SSD) layer.",
    (
        Param("d_state", "int", 128, min=1, doc="SSM state size N"),
        Param("head_dim", "int", 64, min=1, doc="SSM head dim P"),
        Param("heads", "int", nullable=True, min=1, doc="SSM heads (default: expand * d_model / head_dim)"),
        Param("n_groups", "int", 1, min=1, doc="groups sharing B and C"),
        Param("expand", "int", 2, min=1, doc="d_inner = expand * d_model, unless heads is given"),
        Param("d_conv", "int", 4, min=1, doc="causal conv taps K"),
        Param("chunk", "int", 256, min=1, doc="SSD chunk length C"),
        Param("conv_bias", "bool", True),
        Param("proj_bias", "bool", False),
    ),
    _build_mamba2,
    _count_mamba2,
)


# ---- feed-forward -----------------------------------------------------------------------------


def _build_mlp(v: dict[str, Any], ctx: ModelContext) -> MLPConfig:
    return MLPConfig(d_ff=v["d_ff"], activation=v["act"], bias=v["bias"])


def _count_mlp(c: MLPConfig, d: int) -> int:
    if c.gated:
        return 3 * d * c.d_ff + ((2 * c.d_ff + d) if c.bias else 0)
    return 2 * d * c.d_ff + ((c.d_ff + d) if c.bias else 0)


MLP = LayerKind(
    "mlp",
    "Dense feed-forward network.",
    (
        Param("d_ff", "int", required=True, min=1, doc="hidden width"),
        Param("act", "enum", "swiglu", choices=ACTIVATIONS),
        Param("bias", "bool", False),
    ),
    _build_mlp,
    _count_mlp,
    is_ffn=True,
)


def _build_moe(v: dict[str, Any], ctx: ModelContext) -> MoEConfig:
    if v["top_k"] > v["experts"]:
        raise CheckError(f"top_k ({v['top_k']}) exceeds experts ({v['experts']})", "top_k")
    return MoEConfig(experts=v["experts"], top_k=v["top_k"], d_ff=v["d_ff"], activation=v["act"], routing=v["routing"])


def _count_moe(c: MoEConfig, d: int) -> int:
    return d * c.experts + c.experts * c.expert_params(d)


MOE = LayerKind(
    "moe",
    "Sparse mixture of experts with a linear top-k router.",
    (
        Param("experts", "int", required=True, min=1, doc="E"),
        Param("top_k", "int", 2, min=1, doc="experts per token k"),
        Param("d_ff", "int", required=True, min=1, doc="hidden width of each expert"),
        Param("act", "enum", "swiglu", choices=ACTIVATIONS),
        Param("routing", "enum", "softmax_topk_renorm", choices=ROUTINGS,
              doc="softmax_topk_renorm (Mixtral), softmax_topk (Jamba), topk_softmax"),
    ),
    _build_moe,
    _count_moe,
    is_ffn=True,
)

#: Every kind a `layer NAME = KIND(...)` definition may use.
REGISTRY: dict[str, LayerKind] = {k.name: k for k in (ATTENTION, MAMBA, MAMBA2, MLP, MOE)}

#: The parameter every kind accepts in addition to its own: the sub-layer's pre-norm.
NORM_PARAM = Param("norm", "norm", doc="pre-norm of this sub-layer (default: the model's norm)")


def count_params(config: MixerConfig, d_model: int) -> int:
    """Parameters of a mixer or FFN (its norm excluded)."""
    return REGISTRY[config.kind].count(config, d_model)
