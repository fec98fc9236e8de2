"""A whole transformer block used as one branch, with per-use LoRA adapters (Zamba, Zamba2): config and facets.

    layer sattn = attention(heads = 32, head_dim = 2 * d_model / 32, scale = (2 * d_model / 32 / 2) ** -0.5,
                            rope_theta = none)
    layer smlp  = mlp(d_ff = 4 * d_model, act = geglu)
    layer tf    = transformer_block(attn = sattn, ffn = smlp, adapter_rank = 128, attn_adapters = false,
                                    input = concat_embed, into = next_input)
    shared block z { tf }
    stack { ssm ssm z ssm ... }

On its sub-layer's normed input u (d_in wide: 2 * d_model when the sub-layer reads `input = concat_embed`,
the pre-norm then normalising cat[x, embeddings] as one 2d vector) the block computes, with no residual
inside (Glorioso et al. 2024, "Zamba"; transformers' Zamba2AttentionDecoderLayer and Zamba2HybridLayer):

    a = attn(u)                        q/k/v = W u + B_u (A_u u) with the use's adapters    [T, d]
    f = ffn(mid_norm(a))               gate|up = W a' + B_u (A_u a') (one adapter on both)    [T, d]
    out = P_u f                        the use's own [d, d] projection (`out_proj`)          [T, d]

Shared by every use of a `shared block`: the attention (its q/k/v read d_in channels, o_proj writes d), the
MLP and the mid norm. Owned by each use (`per_use`): the LoRA adapters of rank r (`adapter_rank`; A [r, in]
and B [out, r] on q, k and v when `attn_adapters`, on the fused gate|up rows when `ffn_adapters`; Hu et al.
2021, "LoRA", added to the frozen projection's output as Zamba2 does, with no scaling) and `out_proj`.

Counts: attention with d_in input columns, + MLP + mid norm (d, and a bias for layernorm), + per use
adapters r * (in + out) each and d * d for out_proj. Caches: the attention's KV cache, once per use (each
use is its own sub-layer with its own keys). FLOPs: the attention's score FLOPs (parameters count 2 per
token per use, as for every kind). Prefill workspace: the larger of the attention's and the MLP's, plus the
d_in-wide input and the d-wide attention output held across (a * n * (d_in + d), n = b * Cc/c tokens).
Training activations: the attention's and the MLP's (the MLP's norm term standing for the mid norm's input),
plus out_proj's input a*sbh, and what the sub-layer's pre-norm keeps beyond the frame's d channels when it
reads d_in = 2d (`MicroBatch.base_at`). These two are the sum of the parts' own formulas, with the attention's
d-wide terms taken at d (its d_in-wide q/k/v input is the sub-layer norm's output, counted by the frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from ltmdsl.ir import LayerConfig, NormConfig
from ltmdsl.kinds.base import GATED, CacheTerm, CheckError, Flops, Kind, ModelContext, Param, Split
from ltmdsl.memory.symbols import B, C, Largest, Smallest, T, per_replica

R = sympy.Rational


@dataclass(frozen=True)
class TransformerBlockConfig(LayerConfig):
    """Attention -> mid norm -> MLP -> out_proj as one branch, with per-use adapters (module docstring)."""

    attn: LayerConfig  # an attention config
    ffn: LayerConfig  # an mlp config
    mid_norm: NormConfig
    d_in: int  # the width the attention reads: d_model, or 2 * d_model under `input = concat_embed`
    adapter_rank: int  # r; 0 = no adapters
    attn_adapters: bool
    ffn_adapters: bool
    out_proj: bool
    kind: str = field(default="transformer_block", init=False)

    @property
    def attn_outs(self) -> tuple[tuple[str, int], ...]:
        """(projection, output rows) of the attention's q, k and v."""
        a = self.attn
        return (("q", a.heads * a.head_dim * (2 if a.gate else 1)), ("k", a.kv_heads * a.head_dim),
                ("v", a.kv_heads * a.v_head_dim))

    @property
    def ffn_rows(self) -> int:
        """Rows of the MLP's input projections the adapter adds to: gate and up (up alone when not gated)."""
        return (2 if self.ffn.activation in GATED else 1) * self.ffn.d_ff

    def adapters(self, d: int) -> tuple[tuple[str, int, int], ...]:
        """(name, in, out) of each adapter a use owns: q, k, v (attn_adapters) and gate_up (ffn_adapters)."""
        if not self.adapter_rank:
            return ()
        out = [(name, self.d_in, rows) for name, rows in self.attn_outs] if self.attn_adapters else []
        if self.ffn_adapters:
            out.append(("gate_up", d, self.ffn_rows))
        return tuple(out)


def _kind(c: LayerConfig) -> Kind:
    from ltmdsl.kinds import kind_of  # the registry imports this module

    return kind_of(c)


def build(v: dict[str, Any], ctx: ModelContext) -> TransformerBlockConfig:
    attn, ffn = v["attn"], v["ffn"]
    if getattr(attn, "kind", None) != "attention":
        raise CheckError(f"attn must name an attention layer; it names a {getattr(attn, 'kind', '?')} layer", "attn")
    if getattr(ffn, "kind", None) != "mlp":
        raise CheckError(f"ffn must name an mlp layer; it names a {getattr(ffn, 'kind', '?')} layer", "ffn")
    rank = v["adapter_rank"]
    for flag in ("attn_adapters", "ffn_adapters"):
        if v[flag] is not None and v[flag] and not rank:
            raise CheckError(f"{flag} = true needs adapter_rank > 0", flag)
    return TransformerBlockConfig(
        attn=attn, ffn=ffn, mid_norm=v["mid_norm"] if v["mid_norm"] is not None else ctx.norm, d_in=ctx.width_in,
        adapter_rank=rank, attn_adapters=bool(rank) and v["attn_adapters"] is not False,
        ffn_adapters=bool(rank) and v["ffn_adapters"] is not False, out_proj=v["out_proj"])


def per_use(c: TransformerBlockConfig, d: int) -> int:
    """Parameters each use owns: the adapters (r * (in + out) each) and out_proj (d * d)."""
    lora = sum(c.adapter_rank * (i + o) for _, i, o in c.adapters(d))
    return lora + (d * d if c.out_proj else 0)


def count(c: TransformerBlockConfig, d: int) -> int:
    """The attention with d_in input columns, the MLP, the mid norm, and one use's own parameters."""
    wide = (c.d_in - d) * sum(rows for _, rows in c.attn_outs)  # q/k/v read d_in channels, not d
    shared = _kind(c.attn).count(c.attn, d) + wide + _kind(c.ffn).count(c.ffn, d)
    return shared + c.mid_norm.params_per_channel * d + per_use(c, d)


def inactive(c: TransformerBlockConfig, d: int) -> int:
    return 0


def split(c: TransformerBlockConfig, d: int) -> Split:
    """The attention's and MLP's own splits (K/V grouped by KV heads over d_in input channels), the mid norm
    replicated; each use's adapters split with what they feed (A by its rank r, which tp must divide; B as
    the projection it adds to, K and V's grouped with the KV heads) and its out_proj split."""
    from ltmdsl.kinds.attention import kv_params

    a, f = c.attn, c.ffn
    attn, ffn = _kind(a).split(a, d), _kind(f).split(f, d)
    adapters = c.adapters(d)
    kv_lora = c.adapter_rank * a.kv_heads * (a.head_dim + a.v_head_dim) if c.attn_adapters else 0
    use_grouped = (("kv heads", a.kv_heads, kv_lora),) if kv_lora else ()
    return Split(tp=attn.tp + ffn.tp + ((("adapter channels (adapter_rank)", c.adapter_rank),) if adapters else ()),
                 replicated=attn.replicated + ffn.replicated + c.mid_norm.params_per_channel * d,
                 grouped=(("kv heads", a.kv_heads, kv_params(a, c.d_in) + kv_lora),), use_grouped=use_grouped)


def context_check(c: TransformerBlockConfig, context: int) -> str | None:
    return _kind(c.attn).context_check(c.attn, context)


def cache(c: TransformerBlockConfig, s) -> tuple[CacheTerm, ...]:
    """The attention's KV cache, labelled `transformer_block/attention`; one per use (each use a sub-layer)."""
    return tuple(CacheTerm(t.component, "attention" if t.part is None else f"attention/{t.part}", t.dtype, t.bytes)
                 for t in _kind(c.attn).cache(c.attn, s))


def workspace(c: TransformerBlockConfig, d: int, s):
    tok = per_replica(B, s.dp) * Smallest(C, T) / R(s.cp)  # b * Cc / c
    parts = Largest(_kind(c.attn).workspace(c.attn, d, s), _kind(c.ffn).workspace(c.ffn, d, s))
    return parts + s.activation_dtype.bytes * tok * (c.d_in + d)


def stored(c: TransformerBlockConfig, x, selective: bool):
    out = _kind(c.attn).stored(c.attn, x, selective) + _kind(c.ffn).stored(c.ffn, x, selective)
    wide = x.base_at(c.d_in) - x.base  # the sub-layer's pre-norm over d_in = 2d channels (concat_embed)
    return out + wide + (x.rep(x.a * x.tok * x.h) if c.out_proj else 0)


def flops(c: TransformerBlockConfig) -> dict[str, Flops]:
    return dict(_kind(c.attn).flops(c.attn))


def dims(c: TransformerBlockConfig) -> str:
    extra = f" in={c.d_in}"
    if c.adapter_rank:
        on = "+".join(n for n, flag in (("qkv", c.attn_adapters), ("ffn", c.ffn_adapters)) if flag)
        extra += f" lora r={c.adapter_rank} on {on}"
    if c.out_proj:
        extra += " out_proj"
    return (f"attn: {_kind(c.attn).dims(c.attn)} | ffn: {_kind(c.ffn).dims(c.ffn)} |{extra}")


def backward(c: TransformerBlockConfig, x):
    """The larger part's backward (attention or FFN) beside the gradient of the block's stream between them,
    a*tok*d (replicated)."""
    parts = Largest(_kind(c.attn).backward(c.attn, x), _kind(c.ffn).backward(c.ffn, x))
    return parts + x.rep(x.a * x.tok * x.h)


KIND = Kind(
    name="transformer_block",
    doc="Attention, a norm and an MLP as one branch with per-use LoRA adapters and projection (Zamba's shared block).",
    config=TransformerBlockConfig,
    params=(
        Param("attn", "layer", required=True, doc="the attention: an attention layer definition"),
        Param("ffn", "layer", required=True, doc="the MLP: an mlp layer definition"),
        Param("mid_norm", "norm", nullable=True, doc="norm between attention and MLP (default: the model's norm)"),
        Param("adapter_rank", "int", 0, min=0, doc="rank r of the per-use LoRA adapters; 0 = none"),
        Param("attn_adapters", "bool", nullable=True, doc="adapters on q, k and v (default: with adapter_rank)"),
        Param("ffn_adapters", "bool", nullable=True,
              doc="an adapter on the MLP's gate|up (default: with adapter_rank)"),
        Param("out_proj", "bool", True, doc="a per-use [d, d] projection of the output"),
    ),
    is_ffn=False,
    build=build,
    count=count,
    inactive=inactive,
    split=split,
    context_check=context_check,
    cache=cache,
    workspace=workspace,
    stored=stored,
    backward=backward,
    flops=flops,
    dims=dims,
    per_use=per_use,
)
