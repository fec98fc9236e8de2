"""The Hugging Face facet of mlstm (see ltmdsl.hf.facet): config keys and export fields of xLSTM's mLSTM layer.

transformers' xLSTMLayer (model_type "xlstm", xLSTM-7B) is the mixer of every block (`mlstm_layer`). Its keys:
`num_heads` (H), `qk_dim_factor` / `v_dim_factor` (the q/k and value widths: hidden_size * factor, which
must be a multiple of 64 for xLSTMLayer's widths to agree with xLSTMCache's), `gate_soft_cap` (null: uncapped gates), `use_bias`,
`chunk_size` (the chunkwise kernel's chunk), `eps` (the mLSTM denominator's) and `norm_eps` (its per-head
LayerNorm's, shared with the block norms). The kernel-selection keys (`chunkwise_kernel`, `mode`, ...) pick
between implementations of the same computation and are checked against transformers' choices by the family.
"""

from __future__ import annotations

from ltmdsl.hf import HFError
from ltmdsl.hf.facet import HFFacet, ReadContext
from ltmdsl.hf.reader import Reader
from ltmdsl.hf.spec import num, show_value

#: xLSTMConfig rounds its q/k and value widths up to a multiple of this.
WIDTH_MULTIPLE = 64


def round_up(x: float, multiple: int) -> int:
    """x rounded up to the next multiple (xLSTMConfig's round_up_to_next_multiple_of, integer for integer x)."""
    return int(((x + multiple - 1) // multiple) * multiple)


def width(r: Reader, key: str, default: float, d: int) -> int:
    """hidden_size * `key`: xLSTMLayer's int(hidden_size * factor), which must equal xLSTMConfig's qk_dim / v_dim
    (that rounded up to a multiple of 64), the width xLSTMCache sizes the recurrent state at."""
    factor = r.float(key, default)
    out = int(d * factor)
    if not 1 <= out <= 2**31 - 1:
        raise r.fail(f"'{key}' = {show_value(factor)} gives a width of {out} for hidden_size {d}, not a positive size")
    if out != round_up(d * factor, WIDTH_MULTIPLE):
        raise r.fail(f"'{key}' = {show_value(factor)} makes transformers' xLSTMLayer {out} wide but its cache "
                     f"{round_up(d * factor, WIDTH_MULTIPLE)} (hidden_size * factor rounded up to a multiple of "
                     f"{WIDTH_MULTIPLE}); choose a factor that makes hidden_size * factor a multiple of {WIDTH_MULTIPLE}")
    return out


def soft_cap(r: Reader, key: str, default: float) -> float | None:
    """A soft-cap value: a positive number, or None where the config states null (transformers' soft_cap is then
    the identity; an absent key takes xLSTMConfig's default)."""
    if key in r.cfg and r.cfg[key] is None:
        r.used.add(key)
        return None
    return r.float(key, default)


def read(r: Reader, ctx: ReadContext) -> dict:
    if ctx.family != "xlstm":
        raise HFError(f"internal: mlstm has no reader for {ctx.family}")
    d = ctx.d_model
    heads = r.int("num_heads", 8, maximum=65536)
    qk, v = width(r, "qk_dim_factor", 0.5, d), width(r, "v_dim_factor", 1.0, d)
    for key, w in (("qk_dim_factor", qk), ("v_dim_factor", v)):
        if w % heads:
            raise r.fail(f"the width {w} from '{key}' is not a multiple of 'num_heads' {heads} (each head takes "
                         f"width / num_heads channels)")
    cap = soft_cap(r, "gate_soft_cap", 15.0)
    return dict(heads=heads, qk_dim=qk, v_dim=v, soft_cap=cap, bias=ctx.shared["bias"],
                chunk=r.int("chunk_size", 64, maximum=1 << 20), eps=r.eps("eps", 1e-6),
                norm_eps=r.eps("norm_eps", 1e-6))


def call(v: dict) -> str:
    cap = "none" if v["soft_cap"] is None else num(float(v["soft_cap"]))
    return (f"mlstm(heads = {num(v['heads'])}, qk_dim = {num(v['qk_dim'])}, v_dim = {num(v['v_dim'])}, "
            f"soft_cap = {cap}, chunk = {num(v['chunk'])}"
            f"{', bias = true' if v['bias'] else ''}"
            f"{'' if v['eps'] == 1e-6 else ', eps = ' + num(v['eps'])}"
            f"{'' if v['norm_eps'] == 1e-6 else ', norm_eps = ' + num(v['norm_eps'])})")


def factor_for(width: int, d: int, key: str) -> float:
    """The `key` factor that makes transformers' xLSTMLayer (and xLSTMCache) `width` wide for hidden_size d."""
    factor = width / d
    if int(d * factor) != width or round_up(d * factor, WIDTH_MULTIPLE) != width:
        raise HFError(f"xLSTM's {key} cannot give a width of {width} for hidden_size {d}: transformers' xLSTM "
                      f"takes widths that are multiples of {WIDTH_MULTIPLE}")
    return factor


def write(c, fam: str, d: int) -> dict:
    why = misfit(c, fam)
    if why:
        raise HFError(why)
    if c.eps >= 1:
        raise HFError(f"xLSTM's eps must be below 1, got {c.eps}")
    return {"num_heads": c.heads, "qk_dim_factor": factor_for(c.qk_dim, d, "qk_dim_factor"),
            "v_dim_factor": factor_for(c.v_dim, d, "v_dim_factor"), "gate_soft_cap": c.soft_cap,
            "chunk_size": c.chunk, "eps": c.eps, "norm_eps": c.norm_eps, "use_bias": False}


def misfit(c, fam: str) -> str | None:
    if fam != "xlstm":
        return f"{fam} has no mLSTM layers (xLSTM has)"
    return "xLSTM's use_bias would also give its block norms biases, which ltmdsl's norms lack" if c.bias else None


def traits(c) -> frozenset[str]:
    return frozenset()


HF = HFFacet(name="mlstm", label="mLSTM", families=("xlstm",), modules={"xlstm": ("mlstm_layer",)}, read=read,
             call=call, write=write, misfit=misfit, traits=traits)
