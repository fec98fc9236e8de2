"""The Hugging Face facet of short_conv (see ltmdsl.hf.facet): config keys, tensor names and export fields.

LFM2's gated short convolution (transformers' Lfm2ShortConv) is the mixer of LFM2's "conv" layers. Its keys:
`conv_L_cache` (the taps L, default 3) and `conv_bias` (a bias on in_proj, the conv and out_proj together,
default false). The convolution runs over the model width: transformers builds it from `hidden_size`, so the
original checkpoints' `conv_dim` / `conv_dim_out`, when stated, must equal hidden_size (another value would be
a layer transformers does not build). Its tensors `in_proj`, `conv`, `out_proj` (conv weight [d, 1, L]) carry
the runtime's names under `conv`.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import boolean, num

#: The largest conv_L_cache we read (the language bounds the kernel too; this keeps messages in config terms).
MAX_TAPS = 1024


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family != "lfm2":
        raise HFError(f"internal: short_conv has no reader for {ctx.family}")
    for key in ("conv_dim", "conv_dim_out"):  # LFM2's original config names for the conv width
        r.expect(key, lambda v, d=ctx.d_model: v is None or v == d, f"null or hidden_size ({ctx.d_model}); "
                 "transformers' Lfm2ShortConv convolves over hidden_size channels")
    r.raw("conv_use_xavier_init", None)  # initialisation only
    return dict(kernel=r.int("conv_L_cache", 3, maximum=MAX_TAPS), bias=r.bool("conv_bias", False))


def call(v: dict) -> str:
    return f"short_conv(kernel = {num(v['kernel'])}, bias = {boolean(v['bias'])})"


def write(c, fam: str, d: int) -> dict:
    if fam != "lfm2":
        raise HFError(f"{fam} has no short convolution layers")
    if c.width != d:
        raise HFError(f"LFM2's short convolutions run over hidden_size channels, not {c.width}")
    return {"conv_L_cache": c.kernel, "conv_bias": c.bias}


def misfit(c, fam: str) -> str | None:
    return None if fam == "lfm2" else f"{fam} has no short convolution layers (LFM2 has)"


def traits(c) -> frozenset[str]:
    return frozenset({"bias"} if c.bias else set())


HF = HFFacet(name="short_conv", label="short convolution", families=("lfm2",), modules={"lfm2": ("conv",)},
             read=read, call=call, write=write, misfit=misfit, traits=traits)
