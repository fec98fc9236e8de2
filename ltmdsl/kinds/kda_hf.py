"""The Hugging Face facet of kda (see ltmdsl.hf.facet): config keys, tensor names and export fields.

Kimi Delta Attention is Kimi-Linear's linear-attention mixer (transformers' KimiLinearDeltaAttention, under
`self_attn` like the model's MLA layers). KimiLinearConfig reads its sizes from the `linear_attn_config` dict
of the published configs (`num_heads`, `head_dim`, `short_conv_kernel_size`), which wins over its own flat
keys `linear_num_heads`, `linear_head_dim`, `linear_conv_kernel_dim` (which it also saves); stated both ways,
they must agree. Its convs have no bias, its gated output norm uses `rms_norm_eps` (the sub-layer norm's eps
in ltmdsl) and its conv activation is `hidden_act` (silu, which the family checks).

Tensors: transformers' module names are the runtime's (`conv1d`, `forget_gate.f_a_proj` / `f_b_proj` /
`dt_bias` / `A_log`, ...); the published checkpoints (and transformers' `save_original_format`) keep three
convs `q_conv1d`, `k_conv1d`, `v_conv1d` and the forget gate's tensors directly under `self_attn`. Import
reads whichever the checkpoint has (the three convs concatenated through op "rows", which needs the layer's
width, `Site.layer`); export writes the published layout, or transformers' own where it writes the experts
fused (`Site.fused`, export-hf --fused-experts: transformers 5's layout throughout).
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext, Site, Source, copy_tensor
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num, show_value
from ltmdsl.kinds.gated_deltanet_hf import CHUNK

#: linear_attn_config key -> KimiLinearConfig's flat key and default.
SIZES = {"num_heads": ("linear_num_heads", 32), "head_dim": ("linear_head_dim", 128),
         "short_conv_kernel_size": ("linear_conv_kernel_dim", 4)}
#: The layer placement keys of linear_attn_config (1-based layer numbers), read by the family.
PLACEMENT = ("full_attn_layers", "kda_layers")

_CONVS = ("q_conv1d", "k_conv1d", "v_conv1d")
_FORGET = ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log")


def linear_attn_config(r: Reader) -> dict:
    """The `linear_attn_config` dict (empty when absent), with its keys checked against what it may hold."""
    sub = r.raw("linear_attn_config", {})
    if not isinstance(sub, dict):
        raise r.fail(f"'linear_attn_config' must be a JSON object, got {show_value(sub)}")
    unknown = sorted(str(k) for k in sub if k not in (*SIZES, *PLACEMENT))
    if unknown:
        raise r.fail(f"'linear_attn_config' keys {', '.join(repr(k) for k in unknown)} are not supported (supported: "
                     f"{', '.join((*SIZES, *PLACEMENT))})")
    return sub


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family != "kimi_linear":
        raise HFError(f"internal: kda has no reader for {ctx.family}")
    sub = linear_attn_config(r)
    values = {}
    for key, (flat, default) in SIZES.items():
        value = r.int(flat, default)
        if key in sub:
            inner = sub[key]
            if isinstance(inner, float) and inner.is_integer():
                inner = int(inner)
            if not isinstance(inner, int) or isinstance(inner, bool) or not 1 <= inner <= 2**31 - 1:
                raise r.fail(f"'linear_attn_config.{key}' must be a positive integer, got {show_value(sub[key])}")
            if r.present(flat) and inner != value:
                raise r.fail(f"'linear_attn_config.{key}' ({inner}) disagrees with '{flat}' ({value}); transformers "
                             "reads the first")
            value = inner
        values[key] = value
    return dict(heads=values["num_heads"], head_dim=values["head_dim"], d_conv=values["short_conv_kernel_size"])


def call(v: dict) -> str:
    return (f"kda(heads = {num(v['heads'])}, head_dim = {num(v['head_dim'])}, d_conv = {num(v['d_conv'])}, "
            f"chunk = {num(CHUNK)})")


def misfit(c, fam: str) -> str | None:
    if fam != "kimi_linear":
        return f"{fam} has no Kimi Delta Attention layers"
    return "Kimi-Linear's KDA convs have no bias" if c.conv_bias else None


def write(c, fam: str, d: int) -> dict:
    why = misfit(c, fam)
    if why:
        raise HFError(why)
    return {"linear_num_heads": c.heads, "linear_head_dim": c.head_dim, "linear_conv_kernel_dim": c.d_conv,
            "linear_attn_config": {"num_heads": c.heads, "head_dim": c.head_dim, "short_conv_kernel_size": c.d_conv}}


def traits(c) -> frozenset[str]:
    return frozenset()


def tensors(facet: HFFacet, rest: str, site: Site) -> Source:
    """The runtime's names where the checkpoint has them or export writes transformers' own layout (module
    docstring), else the published ones."""
    block = f"{site.block}{facet.modules[site.family][0]}."
    own = site.fused if site.available is None else f"{block}conv1d.weight" in site.available
    if own:
        return copy_tensor(facet, rest, site)
    if rest == "conv1d.weight":
        if site.layer is None:
            raise HFError(f"internal: {site.family}'s {rest} needs the layer's width (Site.layer)")
        n = site.layer.inner
        return Source(tuple(f"{block}{c}.weight" for c in _CONVS), "rows", ((0, 0, n), (1, 0, n), (2, 0, n)))
    if rest.startswith("forget_gate.") and rest.split(".", 1)[1] in _FORGET:
        return Source((f"{block}{rest.split('.', 1)[1]}",))
    return copy_tensor(facet, rest, site)


HF = HFFacet(name="kda", label="KDA", families=("kimi_linear",), modules={"kimi_linear": ("self_attn",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits, tensors=tensors)
