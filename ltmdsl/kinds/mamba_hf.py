"""The Hugging Face facet of mamba (see ltmdsl.hf.facet): config keys, tensor names and export fields.

Mamba-1 appears in transformers' Mamba (MambaForCausalLM: keys `state_size`, `conv_kernel`, `expand`,
`time_step_rank`, no inner norms) and inside Jamba (keys `mamba_*`, with the inner RMSNorms of dt, B and C).
`time_step_rank: "auto"` is ceil(d_model / 16), as both config classes say. Its tensors (`in_proj`,
`conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`, Jamba's `dt_layernorm` / `b_layernorm` /
`c_layernorm`) carry the runtime's names under `mixer` (Mamba) or `mamba` (Jamba) and are copied as they are.
"""

from __future__ import annotations

import math

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import Reader, int_expand
from ltmdsl.hf.spec import boolean, num


def _dt_rank(r: Reader, key: str, d: int) -> int:
    value = r.raw(key, "auto")
    return math.ceil(d / 16) if value == "auto" else r.int(key)


def read(r: Reader, ctx: ReadContext) -> dict:
    d = ctx.d_model
    if ctx.family == "mamba":
        expand = int_expand(r, "expand", 2)
        if r.present("intermediate_size") and r.int("intermediate_size") != expand * d:
            raise r.fail(f"'intermediate_size' {r.cfg['intermediate_size']} != expand * hidden_size = {expand * d}")
        dt_rank = _dt_rank(r, "time_step_rank", d)
        r.act()
        r.expect("rms_norm", lambda v: v is True, "true", True)
        return dict(d_state=r.int("state_size", 16), d_conv=r.int("conv_kernel", 4), expand=expand, dt_rank=dt_rank,
                    conv_bias=r.bool("use_conv_bias", True), proj_bias=r.bool("use_bias", False), inner_norms=False)
    if ctx.family == "jamba":
        r.expect("mamba_inner_layernorms", lambda v: v is True, "true", True)
        dt_rank = _dt_rank(r, "mamba_dt_rank", d)
        return dict(d_state=r.int("mamba_d_state", 16), d_conv=r.int("mamba_d_conv", 4),
                    expand=int_expand(r, "mamba_expand", 2), dt_rank=dt_rank,
                    conv_bias=r.bool("mamba_conv_bias", True), proj_bias=r.bool("mamba_proj_bias", False),
                    inner_norms=True)
    raise HFError(f"internal: mamba has no reader for {ctx.family}")


def call(v: dict) -> str:
    return (f"mamba(d_state = {num(v['d_state'])}, d_conv = {num(v['d_conv'])}, expand = {num(v['expand'])}, "
            f"dt_rank = {num(v['dt_rank'])}, conv_bias = {boolean(v['conv_bias'])}, "
            f"proj_bias = {boolean(v['proj_bias'])}, inner_norms = {boolean(v['inner_norms'])})")


def write(m, fam: str, d: int) -> dict:
    if fam == "mamba":
        if m.inner_norms:
            raise HFError("Mamba layers with inner_norms exist in Hugging Face only inside Jamba")
        return {"state_size": m.d_state, "conv_kernel": m.d_conv, "expand": m.expand, "time_step_rank": m.dt_rank,
                "use_conv_bias": m.conv_bias, "use_bias": m.proj_bias, "hidden_act": "silu",
                "intermediate_size": m.d_inner}
    if fam == "jamba":
        if not m.inner_norms:
            raise HFError("Jamba's Mamba layers have inner norms (inner_norms = true)")
        return dict(mamba_d_state=m.d_state, mamba_d_conv=m.d_conv, mamba_expand=m.expand, mamba_dt_rank=m.dt_rank,
                    mamba_conv_bias=m.conv_bias, mamba_proj_bias=m.proj_bias)
    raise HFError(f"{fam} has no Mamba-1 layers")


def misfit(m, fam: str) -> str | None:
    if fam == "mamba":
        return "Mamba has Mamba-1 layers only (without inner norms)" if m.inner_norms else None
    if fam == "jamba":
        return None if m.inner_norms else "Jamba's Mamba layers have inner norms (inner_norms = true)"
    return f"{fam} has no Mamba-1 layers"


def traits(m) -> frozenset[str]:
    return frozenset({"inner_norms"} if m.inner_norms else set())


HF = HFFacet(name="mamba", label="Mamba", families=("mamba", "jamba"),
             modules={"mamba": ("mixer",), "jamba": ("mamba",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits)
