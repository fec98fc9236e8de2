"""The Hugging Face facet of mamba2 (see ltmdsl.hf.facet): config keys, tensor names and export fields.

Mamba-2 (SSD) appears in transformers' Mamba-2 (keys `num_heads`, `head_dim`, `state_size`, `n_groups`, ...),
Nemotron-H (`mamba_num_heads`, `mamba_head_dim`, `ssm_state_size`; `mamba_d_conv` / `conv_kernel` and the like
are aliases), Bamba and Granite-4.0-H (granitemoehybrid; both `mamba_n_heads`, `mamba_d_head` ("auto":
d_inner / heads), `mamba_*`). Mamba-2, Bamba and Granite need d_inner = expand * d_model; Nemotron-H's inner
width is mamba_num_heads * mamba_head_dim whatever `expand` says (Nemotron-3-Nano: 64 * 64 = 4096 beside
hidden_size 2688), written `heads` in the spec then. Its tensors (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`,
`norm`, `out_proj`) carry the runtime's names under `mixer` (Bamba, Granite: `mamba`).
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import Reader, int_expand, time_step_limit_ok
from ltmdsl.hf.spec import boolean, num


def read(r: Reader, ctx: ReadContext) -> dict:
    fam, d = ctx.family, ctx.d_model
    if fam == "mamba2":
        heads, head_dim = r.int("num_heads", 128), r.int("head_dim", 64)
        expand = int_expand(r, "expand", 2)
        groups = r.int("n_groups", 8)
        if heads * head_dim != expand * d:
            raise r.fail(f"num_heads * head_dim = {heads * head_dim} != expand * hidden_size = {expand * d}")
        if heads % groups:
            raise r.fail(f"num_heads {heads} is not a multiple of n_groups {groups}")
        r.act()
        r.expect("rms_norm", lambda v: v is True, "true", True)
        r.expect("norm_before_gate", lambda v: v is False, "false", False)
        r.expect("time_step_limit", time_step_limit_ok, "[0.0, inf]")
        r.raw("time_step_rank", None)  # unused by the Mamba-2 forward pass
        return dict(d_state=r.int("state_size", 128), head_dim=head_dim, n_groups=groups, expand=expand,
                    d_conv=r.int("conv_kernel", 4), chunk=r.int("chunk_size", 256),
                    conv_bias=r.bool("use_conv_bias", True), proj_bias=r.bool("use_bias", False))
    if fam == "nemotron_h":
        heads, head_dim = r.int("mamba_num_heads", 128), r.int("mamba_head_dim", 64)
        expand = int_expand(r, *_alias(r, "mamba_expand", "expand"), 2)
        groups = r.int(*_alias(r, "mamba_n_groups", "n_groups"), 8)
        if heads % groups:
            raise r.fail(f"mamba_num_heads {heads} is not a multiple of n_groups {groups}")
        r.act("mamba_hidden_act", "silu")
        r.expect("time_step_limit", time_step_limit_ok, "[0.0, inf]")
        r.expect("mamba_dt_limit", time_step_limit_ok, "[0.0, inf]")
        for alias in ("mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor"):
            r.raw(alias, None)
        conv = r.int(*_alias(r, "mamba_d_conv", "conv_kernel"), 4)
        chunk = r.int(*_alias(r, "mamba_chunk_size", "chunk_size"), 128)
        conv_bias = r.bool(*_alias(r, "mamba_conv_bias", "use_conv_bias"), True)
        values = dict(d_state=r.int("ssm_state_size", 128), head_dim=head_dim, n_groups=groups, expand=expand,
                      d_conv=conv, chunk=chunk, conv_bias=conv_bias, proj_bias=r.bool("use_bias", False))
        if heads * head_dim != expand * d:  # NemotronH's inner width is heads * head_dim, whatever expand says
            values["heads"] = heads
        r.expect("mamba_proj_bias", lambda v: v in (None, False), "false")
        return values
    if fam in ("bamba", "granitemoehybrid"):  # the same keys, defaults and layer (GraniteMoeHybridMambaLayer)
        r.expect("time_step_limit", time_step_limit_ok, "[0.0, inf]")
        n_heads = r.int("mamba_n_heads", 128)
        expand = int_expand(r, "mamba_expand", 2)
        d_inner = expand * d
        if r.raw("mamba_d_head", "auto") == "auto":  # as BambaConfig: the inner width split over the heads
            if d_inner % n_heads:
                raise r.fail(f"mamba_n_heads {n_heads} does not divide mamba_expand * hidden_size = {d_inner}")
            d_head = d_inner // n_heads
        else:
            d_head = r.int("mamba_d_head")
        if d_head * n_heads != d_inner:
            raise r.fail(f"mamba_n_heads * mamba_d_head = {n_heads * d_head} != mamba_expand * hidden_size = "
                         f"{d_inner}")
        groups = r.int("mamba_n_groups", 1)
        if n_heads % groups:
            raise r.fail(f"mamba_n_heads {n_heads} is not a multiple of mamba_n_groups {groups}")
        values = {}
        if ctx.present:
            values = dict(d_state=r.int("mamba_d_state", 256), head_dim=d_head, n_groups=groups, expand=expand,
                          d_conv=r.int("mamba_d_conv", 4), chunk=r.int("mamba_chunk_size", 256),
                          conv_bias=r.bool("mamba_conv_bias", True), proj_bias=r.bool("mamba_proj_bias", False))
        for key in ("mamba_d_state", "mamba_d_conv", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias"):
            r.raw(key, None)  # read above when there is a Mamba layer; unused otherwise
        return values
    raise HFError(f"internal: mamba2 has no reader for {fam}")


def _alias(r: Reader, alias: str, key: str) -> tuple[str]:
    """The one of NemotronHConfig's two names for a setting to read (the `mamba_*` alias wins, as its
    __post_init__ pops it into the other), the other marked read; so that an error names the key that is used."""
    used, other = (alias, key) if r.present(alias) else (key, alias)
    r.raw(other, None)
    return (used,)


def call(v: dict) -> str:
    heads = f"heads = {num(v['heads'])}, " if v.get("heads") is not None else ""
    return (f"mamba2(d_state = {num(v['d_state'])}, head_dim = {num(v['head_dim'])}, {heads}"
            f"n_groups = {num(v['n_groups'])}, "
            f"expand = {num(v['expand'])}, d_conv = {num(v['d_conv'])}, chunk = {num(v['chunk'])}, "
            f"conv_bias = {boolean(v['conv_bias'])}, proj_bias = {boolean(v['proj_bias'])}"
            f"{', gated_norm = false' if v.get('gated_norm') is False else ''})")


def write(m, fam: str, d: int) -> dict:
    if not m.gated_norm:
        raise HFError(misfit(m, fam))
    if fam == "mamba2":
        return {"num_heads": m.heads, "head_dim": m.head_dim, "state_size": m.d_state, "n_groups": m.n_groups,
                "expand": m.expand, "conv_kernel": m.d_conv, "chunk_size": m.chunk, "use_conv_bias": m.conv_bias,
                "use_bias": m.proj_bias, "hidden_act": "silu"}
    if fam == "nemotron_h":
        return dict(mamba_num_heads=m.heads, mamba_head_dim=m.head_dim, ssm_state_size=m.d_state,
                    n_groups=m.n_groups, expand=m.expand, conv_kernel=m.d_conv, chunk_size=m.chunk,
                    use_conv_bias=m.conv_bias, use_bias=m.proj_bias)
    if fam in ("bamba", "granitemoehybrid"):
        if m.d_inner != m.expand * d:
            raise HFError(f"{'Bamba' if fam == 'bamba' else 'Granite-4.0-H'}'s Mamba-2 inner width is mamba_expand * "
                          f"hidden_size; heads * head_dim = {m.d_inner} "
                          f"is not {m.expand} * {d}")
        return dict(mamba_n_heads=m.heads, mamba_d_head=m.head_dim, mamba_n_groups=m.n_groups,
                    mamba_d_state=m.d_state, mamba_expand=m.expand, mamba_d_conv=m.d_conv,
                    mamba_chunk_size=m.chunk, mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.proj_bias)
    if fam == "zamba2":
        if m.d_inner != m.expand * d or m.proj_bias or not m.conv_bias:
            raise HFError("Zamba2's Mamba-2 has the inner width mamba_expand * hidden_size, no projection biases "
                          "(add_bias_linear false here) and conv biases")
        return dict(n_mamba_heads=m.heads, mamba_ngroups=m.n_groups, mamba_d_state=m.d_state, mamba_expand=m.expand,
                    mamba_d_conv=m.d_conv, chunk_size=m.chunk, use_conv_bias=m.conv_bias, time_step_min=m.dt_min)
    raise HFError(f"{fam} has no Mamba-2 layers")


def misfit(m, fam: str) -> str | None:
    if not m.gated_norm:
        return "its Mamba-2 has no gated RMSNorm (gated_norm = false), which only Falcon-H1 has"
    return None if fam in ("mamba2", "nemotron_h", "bamba", "granitemoehybrid", "zamba2") \
        else f"{fam} has no Mamba-2 layers"


def traits(m) -> frozenset[str]:
    return frozenset()


HF = HFFacet(name="mamba2", label="Mamba-2",
             families=("mamba2", "nemotron_h", "bamba", "granitemoehybrid", "zamba2"),
             modules={"mamba2": ("mixer",), "nemotron_h": ("mixer",), "bamba": ("mamba",),
                      "granitemoehybrid": ("mamba",), "zamba2": ("mamba",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits)
