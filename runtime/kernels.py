"""The kernel interface shared by the PyTorch runtime and the Triton back end (docs/CONTRACTS.md).

A `Kernels` instance is a frozen bundle of callables that every layer module receives at construction
(no global registry): `TORCH_KERNELS` is the PyTorch reference, and `ltmdsl.codegen.backend.triton_kernels`
returns another instance with the same signatures. Each reference op sits beside its oracle in its own
module: ops_attention, ops_conv, ops_scan (Mamba-1), ops_ssd (Mamba-2), ops_norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ltmdsl.runtime import ops_attention, ops_conv, ops_norm, ops_scan, ops_ssd


@dataclass(frozen=True)
class Kernels:
    """Callables with the layouts of docs/CONTRACTS.md (sequence dimension explicit everywhere).

    attention(q [B,Tq,H,D], k [B,Tk,Hkv,D], v [B,Tk,Hkv,Dv], *, causal, window, scale) -> [B,Tq,H,Dv]
    attention_decode(q [B,H,D], k_cache [B,S,Hkv,D], v_cache [B,S,Hkv,Dv], *, n_valid, scale) -> [B,H,Dv]
    causal_conv1d(x [B,T,C], weight [C,K], bias, *, prev [B,C,K-1] | None, silu) -> [B,T,C]
    conv_step(x [B,C], state [B,C,K], weight [C,K], bias, *, silu) -> [B,C]            (state in place)
    selective_scan(u, delta [B,T,Di], A [Di,N], Bm, Cm [B,T,N], *, state) -> (y [B,T,Di], state [B,Di,N])
    selective_step(u, delta [B,Di], A [Di,N], Bm, Cm [B,N], state [B,Di,N]) -> [B,Di]    (state in place)
    ssd_scan(x [B,T,Hs,P], dt [B,T,Hs], A [Hs], Bm, Cm [B,T,G,N], *, chunk, state) -> (y, state [B,Hs,P,N])
    ssd_step(x [B,Hs,P], dt [B,Hs], A [Hs], Bm, Cm [B,G,N], state [B,Hs,P,N]) -> [B,Hs,P] (state in place)
    add_rmsnorm(x [...,d], residual [...,d] | None, weight [d], *, eps) -> (normed, summed)
    """

    name: str
    attention: Callable
    attention_decode: Callable
    causal_conv1d: Callable
    conv_step: Callable
    selective_scan: Callable
    selective_step: Callable
    ssd_scan: Callable
    ssd_step: Callable
    add_rmsnorm: Callable


TORCH_KERNELS = Kernels(
    name="torch",
    attention=ops_attention.attention,
    attention_decode=ops_attention.attention_decode,
    causal_conv1d=ops_conv.causal_conv1d,
    conv_step=ops_conv.conv_step,
    selective_scan=ops_scan.selective_scan,
    selective_step=ops_scan.selective_step,
    ssd_scan=ops_ssd.ssd_scan,
    ssd_step=ops_ssd.ssd_step,
    add_rmsnorm=ops_norm.add_rmsnorm,
)

# The plain reference paths (explicit-softmax attention); used by tests and as a debugging back end.
REFERENCE_KERNELS = Kernels(
    name="reference",
    attention=ops_attention.attention_reference,
    attention_decode=ops_attention.attention_decode,
    causal_conv1d=ops_conv.causal_conv1d_reference,
    conv_step=ops_conv.conv_step,
    selective_scan=ops_scan.selective_scan_reference,
    selective_step=ops_scan.selective_step,
    ssd_scan=lambda x, dt, A, Bm, Cm, *, chunk, state: ops_ssd.ssd_scan_reference(x, dt, A, Bm, Cm, state=state),
    ssd_step=ops_ssd.ssd_step,
    add_rmsnorm=ops_norm.add_rmsnorm,
)
