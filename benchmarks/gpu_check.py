"""GPU check of the generated Triton kernels: correctness in bf16 and fp32, then timings.

    python benchmarks/gpu_check.py [--skip-timing] [--only delta]        (run by benchmarks/gpu_check.sh)

Imports only ltmdsl.codegen and the runtime's reference ops; shapes are built directly, so neither a spec
file nor lark is needed (when lark is missing, a stand-in for the spec loader is installed). Correctness:
every kernel against its PyTorch oracle evaluated in float64 on the GPU (fp32 <= 1e-4 with IEEE dots,
bf16 <= 1e-2). Timings (triton.testing.do_bench, ms) against torch SDPA's flash backend for attention
and against the runtime's PyTorch ops for the rest, printed as TFLOP/s, GB/s and fractions of the card's peak
(H100: 989 dense bf16 TFLOP/s, 3.35 TB/s; H200: 989, 4.8 TB/s). Targets: attention forward >= 0.9x SDPA at T 16K, D 128, bf16;
decode attention >= 70% of HBM bandwidth at a 1M-token cache; SSD scan >= 50% of HBM bandwidth; the gated
delta rule (Qwen3-Next's linear layer shape) >= 1.0x flash-linear-attention's `chunk_gated_delta_rule` when
the `fla` package is importable, else timed against the runtime's torch chunked op (the output names the
baseline). `--only delta` runs the delta-rule checks alone (a short device run).
Results go to stdout and, when $OUT is set, to $OUT/gpu_check.txt.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
import types

#: dense bf16 TFLOP/s and HBM GB/s of the cards this runs on (NVIDIA's datasheets, SXM parts); the peaks in use are
#: the running card's (`set_peaks`), H100's when the name is unknown
PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0)}
PEAK_TFLOPS, PEAK_GBS = PEAKS["H100"]


def set_peaks(device_name: str) -> str:
    """Use the peaks of the card named `device_name` (e.g. "NVIDIA H200"); returns the card's key."""
    global PEAK_TFLOPS, PEAK_GBS
    card = next((k for k in PEAKS if k in device_name), "H100")
    PEAK_TFLOPS, PEAK_GBS = PEAKS[card]
    return card


def say(text: str = "") -> None:
    """Print a line and append it to $OUT/gpu_check.txt as it comes (a timeout keeps what was done)."""
    print(text, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_check.txt"), "a") as f:
            f.write(text + "\n")


def _stand_in_loader() -> None:
    """`import ltmdsl` loads the spec parser, which needs lark; the kernels do not. Stub the loader."""
    if importlib.util.find_spec("lark") is not None:
        return
    loader = types.ModuleType("ltmdsl.loader")

    class Spec:  # noqa: D401 - placeholder type
        """Stand-in: no spec loading on this machine (lark is not installed)."""

    def load(*_a, **_k):
        raise RuntimeError("lark is not installed here: gpu_check builds shapes directly")

    loader.Spec, loader.load = Spec, load
    sys.modules["ltmdsl.loader"] = loader


_stand_in_loader()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ltmdsl.codegen import ops  # noqa: E402
from ltmdsl.runtime import ops_attention as RA  # noqa: E402
from ltmdsl.runtime import ops_conv as RC  # noqa: E402
from ltmdsl.runtime import ops_delta as RG  # noqa: E402
from ltmdsl.runtime import ops_norm as RN  # noqa: E402
from ltmdsl.runtime import ops_scan as RS  # noqa: E402
from ltmdsl.runtime import ops_ssd as RD  # noqa: E402

DEV = "cuda"
RESULTS: list[tuple[str, bool, float]] = []


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def check(name: str, out, ref, tol: float) -> None:
    err = rel_err(out, ref)
    ok = err <= tol
    RESULTS.append((name, ok, err))
    say(f"  {'PASS' if ok else 'FAIL'}  {name:<48} rel err {err:.2e} (tol {tol:.0e})")


def d64(*ts):
    return [None if t is None else t.double() for t in ts]


def rn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------

def delta_inputs(B, T, Hk, Hv, Dk, Dv, per_channel: bool, dtype):
    """q, k, v in `dtype`; fp32 log-decays g <= 0 (per head, or per key channel for KDA) and beta, as the
    layers compute them (-exp(A_log) * softplus(a + dt_bias) with A in [1, 16], sigmoid)."""
    q, k, v = rn(B, T, Hk, Dk, dtype=dtype), rn(B, T, Hk, Dk, dtype=dtype), rn(B, T, Hv, Dv, dtype=dtype)
    shape = (B, T, Hv, Dk) if per_channel else (B, T, Hv)
    A = 1 + 15 * torch.rand(Hv, *((1,) if per_channel else ()), device=DEV)
    g = -A * F.softplus(torch.randn(*shape, device=DEV) - 4)
    beta = torch.sigmoid(torch.randn(B, T, Hv, device=DEV))
    return q, k, v, g, beta


#: B, T, Hk, Hv, D (= Dk = Dv), chunk, per_channel: Gated DeltaNet with GVA, KDA, padded head dims
DELTA_CASES = [(2, 1000, 4, 8, 128, 64, False), (1, 777, 4, 4, 128, 64, True), (1, 300, 2, 4, 80, 32, False)]


def correctness_delta(dtype: torch.dtype, cases=DELTA_CASES) -> None:
    """The gated delta rule's kernels against the float64 token loop (chunked and step)."""
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    say(f"correctness, gated delta rule, {'fp32' if dtype == torch.float32 else 'bf16'}")
    for (B, T, Hk, Hv, D, chunk, per_channel) in cases:
        kind = "kda" if per_channel else "gdn"
        q, k, v, g, beta = delta_inputs(B, T, Hk, Hv, D, D, per_channel, dtype)
        s0 = rn(B, Hv, D, D, dtype=torch.float32, scale=0.1)
        o, s = ops.gated_delta_chunked(q, k, v, g, beta, chunk=chunk, state=s0, l2norm=True, scale=None)
        o_ref, s_ref = RG.gated_delta_reference(*d64(q, k, v, g, beta), state=s0.double(), l2norm=True, scale=None)
        check(f"gated_delta {kind} o B{B} T{T} H{Hk}/{Hv} D{D} C{chunk}", o, o_ref, tol)
        check(f"gated_delta {kind} state T{T}", s, s_ref, tol)
        s_ref = s_ref.clone()
        y = ops.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s, l2norm=True, scale=None)
        y_ref = RG.gated_delta_step(*d64(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]), s_ref, l2norm=True,
                                    scale=None)
        check(f"gated_delta_step {kind} o D{D}", y, y_ref, tol)
        check(f"gated_delta_step {kind} state D{D}", s, s_ref, tol)


def correctness(dtype: torch.dtype) -> None:
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    tag = "fp32" if dtype == torch.float32 else "bf16"
    torch.manual_seed(0)
    say(f"correctness, {tag}")
    for (B, Tq, Tk, H, Hkv, D, causal, window) in [
        (2, 1000, 1000, 8, 2, 128, True, None), (1, 777, 777, 8, 8, 64, True, 100),
        (1, 65, 1100, 32, 8, 128, True, None), (1, 513, 513, 6, 2, 80, False, None),
        (1, 300, 300, 4, 1, 256, True, 64),
    ]:
        q, k, v = rn(B, Tq, H, D, dtype=dtype), rn(B, Tk, Hkv, D, dtype=dtype), rn(B, Tk, Hkv, D, dtype=dtype)
        out = ops.attention(q, k, v, causal=causal, window=window, scale=D ** -0.5)
        ref = RA.attention_reference(*d64(q, k, v), causal=causal, window=window, scale=D ** -0.5)
        check(f"attention B{B} Tq{Tq} Tk{Tk} H{H}/{Hkv} D{D} c{int(causal)} w{window}", out, ref, tol)
    for (B, S, n, H, Hkv, D) in [(4, 5000, 4321, 32, 8, 128), (1, 3000, 3000, 8, 1, 64), (2, 700, 1, 16, 16, 128)]:
        q, k, v = rn(B, H, D, dtype=dtype), rn(B, S, Hkv, D, dtype=dtype), rn(B, S, Hkv, D, dtype=dtype)
        ref = RA.attention_decode(*d64(q, k, v), n_valid=n, scale=D ** -0.5)
        out = ops.attention_decode(q, k, v, n_valid=n, scale=D ** -0.5)
        check(f"attention_decode B{B} S{S} n{n} H{H}/{Hkv} D{D}", out, ref, tol)
    B, T, C, K = 2, 1000, 1000, 4
    x, w, b, prev = rn(B, T, C, dtype=dtype), rn(C, K, dtype=dtype), rn(C, dtype=dtype), rn(B, C, K - 1, dtype=dtype)
    check("causal_conv1d", ops.causal_conv1d(x, w, b, prev=prev, silu=True),
          RC.causal_conv1d_reference(*d64(x, w, b), prev=prev.double(), silu=True), tol)
    st = rn(B, C, K, dtype=dtype)
    st_ref = st.double().clone()
    y_ref = RC.conv_step(x[:, 0].double(), st_ref, *d64(w, b), silu=True)
    check("conv_step y", ops.conv_step(x[:, 0], st, w, b, silu=True), y_ref, tol)
    check("conv_step state", st, st_ref, tol)
    B, T, Di, N = 2, 300, 512, 16
    u, dl = rn(B, T, Di, dtype=dtype), F.softplus(rn(B, T, Di, dtype=torch.float32) - 1).to(dtype)
    A = -torch.rand(Di, N, device=DEV) - 0.5
    Bm, Cm = rn(B, T, N, dtype=dtype), rn(B, T, N, dtype=dtype)
    y, s = ops.selective_scan(u, dl, A, Bm, Cm, state=None)
    zeros = torch.zeros(B, Di, N, device=DEV, dtype=torch.float64)  # the oracle allocates on the CPU otherwise
    y_ref, s_ref = RS.selective_scan_reference(*d64(u, dl, A, Bm, Cm), state=zeros)
    check("selective_scan y", y, y_ref, tol)
    check("selective_scan state", s, s_ref, tol)
    s_ref = s_ref.clone()
    check("selective_step y", ops.selective_step(u[:, 0], dl[:, 0], A, Bm[:, 0], Cm[:, 0], s),
          RS.selective_step(*d64(u[:, 0], dl[:, 0], A, Bm[:, 0], Cm[:, 0]), s_ref), tol)
    check("selective_step state", s, s_ref, tol)
    for (B, T, Hs, P, G, N, chunk) in [(2, 1000, 8, 64, 1, 128, 256), (1, 777, 6, 32, 2, 64, 64)]:
        x = rn(B, T, Hs, P, dtype=dtype)
        dt = F.softplus(rn(B, T, Hs, dtype=torch.float32) - 4).to(dtype)
        A = -torch.rand(Hs, device=DEV) - 0.5
        Bm, Cm = rn(B, T, G, N, dtype=dtype), rn(B, T, G, N, dtype=dtype)
        s0 = rn(B, Hs, P, N, dtype=torch.float32)
        y, s = ops.ssd_scan(x, dt, A, Bm, Cm, chunk=chunk, state=s0)
        y_ref, s_ref = RD.ssd_scan_reference(*d64(x, dt, A, Bm, Cm), state=s0.double())
        check(f"ssd_scan y T{T} Hs{Hs} P{P} G{G} N{N} C{chunk}", y, y_ref, tol)
        check(f"ssd_scan state T{T}", s, s_ref, tol)
        s_ref = s_ref.clone()
        check(f"ssd_step y P{P} N{N}", ops.ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], s),
              RD.ssd_step(*d64(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0]), s_ref), tol)
        check(f"ssd_step state P{P} N{N}", s, s_ref, tol)
    x, r, w = rn(3000, 4096, dtype=dtype), rn(3000, 4096, dtype=dtype), rn(4096, dtype=torch.float32)
    n, sm = ops.add_rmsnorm(x, r, w, eps=1e-5)
    n_ref, s_ref = RN.add_rmsnorm(*d64(x, r), w.double(), eps=1e-5)
    check("add_rmsnorm normed", n, n_ref, tol)
    check("add_rmsnorm summed", sm, s_ref, tol)


# ---------------------------------------------------------------------------------------------
# timings
# ---------------------------------------------------------------------------------------------

def bench(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def row(name: str, ms: float, flops: float | None = None, nbytes: float | None = None, base_ms: float | None = None):
    parts = [f"  {name:<44} {ms:8.3f} ms"]
    if flops:
        tf = flops / ms / 1e9
        parts.append(f"{tf:7.1f} TFLOP/s ({tf / PEAK_TFLOPS:5.1%} of peak)")
    if nbytes:
        gbs = nbytes / ms / 1e6
        parts.append(f"{gbs:7.0f} GB/s ({gbs / PEAK_GBS:5.1%} of HBM)")
    if base_ms:
        parts.append(f"speed vs baseline {base_ms / ms:5.2f}x")
    say("  ".join(parts))
    return ms


def timings() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bf = torch.bfloat16
    say("timings (bf16; baseline = torch SDPA flash for attention, the runtime's torch op otherwise)")
    # attention forward, T 16K, D 128, GQA 32/8, causal
    B, T, H, Hkv, D = 1, 16384, 32, 8, 128
    q, k, v = rn(B, T, H, D, dtype=bf), rn(B, T, Hkv, D, dtype=bf), rn(B, T, Hkv, D, dtype=bf)
    qh, kh, vh = q.transpose(1, 2).contiguous(), k.repeat_interleave(H // Hkv, 2).transpose(1, 2).contiguous(), \
        v.repeat_interleave(H // Hkv, 2).transpose(1, 2).contiguous()
    flops = 4 * B * H * T * T * D / 2
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        base = row("sdpa flash causal T16K H32 D128 (MHA)", bench(
            lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)), flops)
    ms = row("triton attention causal T16K H32/8 D128", bench(
        lambda: ops.attention(q, k, v, causal=True, window=None, scale=D ** -0.5)), flops, base_ms=base)
    say(f"    target >= 0.9x SDPA: {'MET' if base / ms >= 0.9 else 'NOT MET'} ({base / ms:.2f}x)")
    W = 4096
    row("triton attention window 4K T16K", bench(
        lambda: ops.attention(q, k, v, causal=True, window=W, scale=D ** -0.5)), 4 * B * H * T * W * D)
    del q, k, v, qh, kh, vh
    # decode over a 1M-token cache
    S = 1 << 20
    q, kc, vc = rn(1, H, D, dtype=bf), rn(1, S, Hkv, D, dtype=bf), rn(1, S, Hkv, D, dtype=bf)
    nbytes = 2 * S * Hkv * D * 2
    base = row("torch attention_decode 1M cache", bench(lambda: RA.attention_decode(q, kc, vc, n_valid=S, scale=0.088)),
               nbytes=nbytes)
    ms = row("triton attention_decode 1M cache H32/8 D128", bench(
        lambda: ops.attention_decode(q, kc, vc, n_valid=S, scale=0.088)), nbytes=nbytes, base_ms=base)
    frac = nbytes / ms / 1e6 / PEAK_GBS
    say(f"    target >= 70% of HBM: {'MET' if frac >= 0.7 else 'NOT MET'} ({frac:.1%})")
    del q, kc, vc
    # SSD scan, Mamba2-2.7B-like heads
    B, T, Hs, P, G, N = 2, 16384, 80, 64, 1, 128
    x = rn(B, T, Hs, P, dtype=bf)
    dt = F.softplus(rn(B, T, Hs, dtype=torch.float32) - 4).to(bf)
    A = -torch.rand(Hs, device=DEV) - 0.5
    Bm, Cm = rn(B, T, G, N, dtype=bf), rn(B, T, G, N, dtype=bf)
    nbytes = (2 * x.numel() + dt.numel() + Bm.numel() + Cm.numel()) * 2 + B * Hs * P * N * 4
    base = row("torch ssd_scan T16K Hs80 P64 N128", bench(
        lambda: RD.ssd_scan(x, dt, A, Bm, Cm, chunk=256, state=None)), nbytes=nbytes)
    ms = row("triton ssd_scan T16K Hs80 P64 N128 C256", bench(
        lambda: ops.ssd_scan(x, dt, A, Bm, Cm, chunk=256, state=None)), nbytes=nbytes, base_ms=base)
    frac = nbytes / ms / 1e6 / PEAK_GBS
    say(f"    target >= 50% of HBM: {'MET' if frac >= 0.5 else 'NOT MET'} ({frac:.1%}; bytes = inputs + y + final state)")
    nc, states = -(-T // 256), B * Hs * P * N * 4
    moved = nbytes + x.numel() * 2 + 4 * nc * states  # x read twice; chunk states written, passed (r+w), read
    say(f"    bytes the four kernels move: {moved / 1e9:.2f} GB -> {moved / ms / 1e6:.0f} GB/s "
        f"({moved / ms / 1e6 / PEAK_GBS:.1%} of HBM)")
    s = torch.zeros(64, Hs, P, N, device=DEV)
    xs, dts, Bs, Cs = rn(64, Hs, P, dtype=bf), dt[0, :64].contiguous(), rn(64, G, N, dtype=bf), rn(64, G, N, dtype=bf)
    sb = 2 * s.numel() * 4
    base = row("torch ssd_step B64", bench(lambda: RD.ssd_step(xs, dts, A, Bs, Cs, s)), nbytes=sb)
    row("triton ssd_step B64 Hs80 P64 N128", bench(lambda: ops.ssd_step(xs, dts, A, Bs, Cs, s)), nbytes=sb,
        base_ms=base)
    del x, dt, Bm, Cm, s
    # Mamba-1 selective scan
    B, T, Di, N = 1, 2048, 5120, 16
    u, dl = rn(B, T, Di, dtype=bf), F.softplus(rn(B, T, Di, dtype=torch.float32) - 1).to(bf)
    A1 = -torch.rand(Di, N, device=DEV) - 0.5
    Bm, Cm = rn(B, T, N, dtype=bf), rn(B, T, N, dtype=bf)
    nbytes = 3 * u.numel() * 2
    base = row("torch selective_scan T2K Di5120 N16", bench(
        lambda: RS.selective_scan(u, dl, A1, Bm, Cm, state=None)), nbytes=nbytes)
    row("triton selective_scan T2K Di5120 N16", bench(
        lambda: ops.selective_scan(u, dl, A1, Bm, Cm, state=None)), nbytes=nbytes, base_ms=base)
    # conv and norm
    x, w, b = rn(2, 16384, 5376, dtype=bf), rn(5376, 4, dtype=bf), rn(5376, dtype=bf)
    nbytes = 2 * x.numel() * 2
    base = row("torch causal_conv1d T16K C5376", bench(lambda: RC.causal_conv1d(x, w, b, prev=None, silu=True)),
               nbytes=nbytes)
    row("triton causal_conv1d T16K C5376", bench(lambda: ops.causal_conv1d(x, w, b, prev=None, silu=True)),
        nbytes=nbytes, base_ms=base)
    x, r, w = rn(16384, 4096, dtype=bf), rn(16384, 4096, dtype=bf), rn(4096, dtype=bf)
    nbytes = 4 * x.numel() * 2
    base = row("torch add_rmsnorm 16K x 4096", bench(lambda: RN.add_rmsnorm(x, r, w, eps=1e-5)), nbytes=nbytes)
    row("triton add_rmsnorm 16K x 4096", bench(lambda: ops.add_rmsnorm(x, r, w, eps=1e-5)), nbytes=nbytes,
        base_ms=base)


def fla_chunk_gated_delta_rule():
    """flash-linear-attention's `chunk_gated_delta_rule`, or None when the `fla` package is not importable."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # not installed, or built for another torch / triton
        return None
    return chunk_gated_delta_rule


def timings_delta() -> None:
    """The gated delta rule at Qwen3-Next's linear-layer shape (Hk 16, Hv 32, Dk = Dv = 128, chunk 64), bf16,
    against fla's chunk_gated_delta_rule when importable (given q, k repeated to Hv heads, as transformers'
    Qwen3-Next does), else against the runtime's torch chunked op; then the decode step against the torch step."""
    bf = torch.bfloat16
    B, T, Hk, Hv, D, C = 1, 8192, 16, 32, 128, 64
    q, k, v, g, beta = delta_inputs(B, T, Hk, Hv, D, D, False, bf)
    nbytes = (q.numel() + k.numel() + 2 * v.numel()) * 2 + (g.numel() + beta.numel()) * 4 + B * Hv * D * D * 4
    flops = B * T * Hv * (4 * C * D + C * 2 * D + 2 * C * D + 6 * D * D)  # the rule's, as ltmdsl.kinds.gated_deltanet counts
    fla = fla_chunk_gated_delta_rule()
    if fla is not None:
        qr, kr = q.repeat_interleave(Hv // Hk, 2), k.repeat_interleave(Hv // Hk, 2)  # [B, T, Hv, D]
        gb = g.to(bf)

        def baseline():
            return fla(qr, kr, v, g=gb, beta=beta.to(bf), initial_state=None, output_final_state=True,
                       use_qk_l2norm_in_kernel=True)

        name = "fla chunk_gated_delta_rule"
        try:
            o_fla = baseline()[0]
            o_ours = ops.gated_delta_chunked(q, k, v, g, beta, chunk=C, state=None, l2norm=True, scale=None)[0]
            say(f"    ours vs fla output: rel err {rel_err(o_ours, o_fla):.2e} (both bf16 out)")
        except Exception as exc:  # an fla without use_qk_l2norm_in_kernel, say: fall back to the torch op
            say(f"    fla chunk_gated_delta_rule failed ({type(exc).__name__}: {exc}); timing against torch instead")
            fla = None
    if fla is None:
        def baseline():
            return RG.gated_delta_chunked(q, k, v, g, beta, chunk=C, state=None, l2norm=True, scale=None)

        name = "torch gated_delta_chunked (fla not importable)"
    say(f"timings, gated delta rule (bf16; baseline = {name})")
    base = row(f"{name[:30]} T8K H16/32 D128", bench(baseline), flops, nbytes)
    ms = row("triton gated_delta_chunked T8K H16/32 D128 C64", bench(
        lambda: ops.gated_delta_chunked(q, k, v, g, beta, chunk=C, state=None, l2norm=True, scale=None)),
        flops, nbytes, base_ms=base)
    say(f"    target >= 1.0x {'fla' if fla is not None else 'torch (fla absent: not the target baseline)'}: "
        f"{'MET' if base / ms >= 1.0 else 'NOT MET'} ({base / ms:.2f}x)")
    qp, kp, vp, gp, bp = delta_inputs(64, 1, Hk, Hv, D, D, False, bf)
    s = torch.zeros(64, Hv, D, D, device=DEV)
    sb = 2 * s.numel() * 4
    base = row("torch gated_delta_step B64", bench(lambda: RG.gated_delta_step(
        qp[:, 0], kp[:, 0], vp[:, 0], gp[:, 0], bp[:, 0], s, l2norm=True, scale=None)), nbytes=sb)
    row("triton gated_delta_step B64 H16/32 D128", bench(lambda: ops.gated_delta_step(
        qp[:, 0], kp[:, 0], vp[:, 0], gp[:, 0], bp[:, 0], s, l2norm=True, scale=None)), nbytes=sb, base_ms=base)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--only", choices=["all", "delta"], default="all",
                    help="run every kernel's checks (default), or only the gated delta rule's")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        say("gpu_check: no CUDA device here; nothing to check")
        return 2
    import triton

    card = set_peaks(torch.cuda.get_device_name())
    say(f"ltmdsl gpu_check: torch {torch.__version__}, triton {triton.__version__}, "
        f"python {sys.version.split()[0]}, device {torch.cuda.get_device_name()} (peaks of {card}: "
        f"{PEAK_TFLOPS:.0f} TFLOP/s, {PEAK_GBS:.0f} GB/s)")
    t0 = time.time()
    status = 0
    checks = [correctness_delta] if args.only == "delta" else [correctness, correctness_delta]
    for dtype in (torch.float32, torch.bfloat16):
        for fn in checks:
            try:
                fn(dtype)
            except Exception:  # keep going: report what broke and time the rest
                say(traceback.format_exc())
                RESULTS.append((f"{fn.__name__} {dtype} raised", False, float("inf")))
    say(f"correctness: {sum(ok for _, ok, _ in RESULTS)}/{len(RESULTS)} passed ({time.time() - t0:.0f} s)")
    if any(not ok for _, ok, _ in RESULTS):
        status = 1
    if not args.skip_timing:
        for fn in [timings_delta] if args.only == "delta" else [timings, timings_delta]:
            try:
                fn()
            except Exception:
                say(traceback.format_exc())
                status = 1
    say(f"fallbacks to torch ops: {dict(ops.FALLBACKS) or 'none'}; total {time.time() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
