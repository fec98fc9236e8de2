"""Host wrappers: the Kernel interface of docs/CONTRACTS.md on top of the generated Triton kernels.

Each function has exactly the signature of its PyTorch reference in ltmdsl.runtime (named in its
docstring), builds the `KernelSpec` for the call's configuration (GQA group, head dims, window, bias,
dtype...), compiles it through the cache (memoised: the first call renders, lints, writes and imports),
allocates outputs and launches. Lengths, strides and pointers are run-time arguments.

Fallbacks to the PyTorch reference, all explicit and counted in `FALLBACKS`:
  * dtypes without kernels (fp64, fp8, mixed input dtypes): the torch op runs instead;
  * configurations whose kernels fail the lint (fp32 SSD with P x N >= 128 x 256, which does not fit in
    shared memory; the delta rule with a chunk of 128 and head dims of 128): the torch op runs instead,
    the delta rule's with a RuntimeWarning saying why;
  * the delta rule with a chunk that is not a power of two (the language refuses one; a direct call
    may pass it): the torch op runs instead, with a RuntimeWarning;
  * backward passes: when autograd needs gradients, the forward still runs on the Triton kernel and
    the backward recomputes the reference op under autograd (`_ReferenceGrad`);
  * CPU tensors without TRITON_INTERPRET=1 raise (the interpreter must be chosen before triton loads).
Host code touches torch.cuda only for CUDA tensors.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import warnings

import torch

from ltmdsl.codegen.cache import compile_spec
from ltmdsl.codegen.lint import LintError
from ltmdsl.codegen.kernelspec import (
    DTYPES,
    KernelSpecError,
    attention_decode_spec,
    attention_spec,
    conv_spec,
    delta_kernel_chunk,
    dtype_name,
    gated_delta_spec,
    interpreting,
    rmsnorm_spec,
    selective_scan_spec,
    ssd_spec,
)

#: op name -> times the torch reference ran instead of a generated kernel (reason in the key)
FALLBACKS: collections.Counter = collections.Counter()

#: When set, every output and scratch buffer starts as NaN, so an element a kernel forgets to write shows
#: up in tests; tests set it with `poisoned()`. A ContextVar rather than a module
#: flag: each thread or task sees only its own setting.
_POISON: contextvars.ContextVar[bool] = contextvars.ContextVar("ltmdsl_poison_outputs", default=False)


@contextlib.contextmanager
def poisoned(flag: bool = True):
    """Within the block, allocate outputs and scratch filled with NaN."""
    token = _POISON.set(flag)
    try:
        yield
    finally:
        _POISON.reset(token)


def _empty(*shape, dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _POISON.get() else t


def _ref():
    from ltmdsl.runtime import kernels

    return kernels.TORCH_KERNELS


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _supported(*tensors) -> str | None:
    """The kernel dtype name when every tensor shares one supported dtype, else None."""
    dts = {t.dtype for t in tensors if t is not None}
    if len(dts) != 1:
        return None
    try:
        name = dtype_name(next(iter(dts)))
    except ValueError:
        return None
    return name if name in DTYPES else None


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


def _rowmajor(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with a unit stride on its last axis (the kernels index that axis without a stride)."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _ReferenceGrad(torch.autograd.Function):
    """Forward on the generated kernel, backward by autograd through the PyTorch reference op."""

    @staticmethod
    def forward(ctx, fast, ref, kwargs, *args):
        ctx.ref, ctx.kwargs, ctx.n = ref, kwargs, len(args)
        ctx.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
        with torch.no_grad():
            out = fast(*args, **kwargs)
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        args = []
        for is_t, other in zip(ctx.is_tensor, ctx.others):
            if is_t:
                t = next(saved)
                args.append(t.detach().requires_grad_(t.requires_grad))
            else:
                args.append(other)
        with torch.enable_grad():
            out = ctx.ref(*args, **ctx.kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        wanted = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        it = iter(got)
        result = [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]
        return (None, None, None, *result)


def _dispatch(name: str, fast, args: tuple, kwargs: dict, dtype_args: tuple):
    """Run `fast` (or the reference for unsupported dtypes / under autograd with a reference backward)."""
    ref = getattr(_ref(), name)
    if _supported(*dtype_args) is None:
        FALLBACKS[f"{name}:dtype"] += 1
        return ref(*args, **kwargs)
    if _needs_grad(*args):
        FALLBACKS[f"{name}:backward"] += 1
        return _ReferenceGrad.apply(fast, ref, kwargs, *args)
    try:
        return fast(*args, **kwargs)
    except LintError:  # raised while compiling, before any launch: no kernel for this configuration
        FALLBACKS[f"{name}:lint"] += 1
        return ref(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def _attention(q, k, v, *, causal, window, scale):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    _check_device(q)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    o = _empty(B, Tq, H, Dv, dtype=q.dtype, device=q.device)
    if Tq == 0 or B == 0:
        return o
    spec = attention_spec(group=H // Hkv, head_dim=D, v_head_dim=Dv, causal=causal,
                          window=window is not None, dtype=dtype_name(q.dtype))
    mod = compile_spec(spec).module
    meta = mod.META["attention_fwd"]
    grid = (_cdiv(Tq, meta["BLOCK_M"]), B * Hkv)
    extra = (int(window),) if window is not None else ()
    mod.attention_fwd[grid](
        q, k, v, o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        Tq, Tk, Hkv, float(scale), *extra, **meta)
    return o


def attention(q, k, v, *, causal: bool, window: int | None, scale: float):
    """Generated forward attention; reference: ltmdsl.runtime.ops_attention.attention (oracle: attention_reference)."""
    return _dispatch("attention", _attention, (q, k, v), dict(causal=causal, window=window, scale=scale), (q, k, v))


def _decode_splits(q: torch.Tensor, programs: int, n_valid: int, block_n: int) -> int:
    """How many pieces to split the cache into: enough programs to fill the GPU (4 per SM)."""
    blocks = max(1, _cdiv(n_valid, block_n))
    if q.is_cuda:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        want = _cdiv(4 * sms, programs)
    else:
        want = 2  # the interpreter runs programs one by one: few splits, still exercising the reduction
    return max(1, min(want, blocks))


def _attention_decode(q, k_cache, v_cache, *, n_valid, scale):
    B, H, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[-1]
    _check_device(q)
    q, k_cache, v_cache = _rowmajor(q), _rowmajor(k_cache), _rowmajor(v_cache)
    G = H // Hkv
    spec = attention_decode_spec(group=G, head_dim=D, v_head_dim=Dv, dtype=dtype_name(q.dtype))
    mod = compile_spec(spec).module
    meta, rmeta = mod.META["attention_decode_split"], mod.META["attention_decode_reduce"]
    n_valid = int(n_valid)
    splits = _decode_splits(q, B * Hkv, n_valid, meta["BLOCK_N"])
    split_len = _cdiv(_cdiv(max(n_valid, 1), splits), meta["BLOCK_N"]) * meta["BLOCK_N"]
    splits = max(1, _cdiv(n_valid, split_len))
    gp, dvp = meta["GROUP_PAD"], meta["DV_PAD"]
    m_part = _empty(B * Hkv, splits, gp, dtype=torch.float32, device=q.device)
    l_part = _empty(*m_part.shape, dtype=torch.float32, device=q.device)
    acc_part = _empty(B * Hkv, splits, gp, dvp, dtype=torch.float32, device=q.device)
    o = _empty(B, H, Dv, dtype=q.dtype, device=q.device)
    mod.attention_decode_split[(B * Hkv, splits)](
        q, k_cache, v_cache, m_part, l_part, acc_part, *q.stride()[:2], *k_cache.stride()[:3],
        *v_cache.stride()[:3], n_valid, split_len, splits, Hkv, float(scale), **meta)
    mod.attention_decode_reduce[(B * Hkv,)](
        m_part, l_part, acc_part, o, *o.stride()[:2], splits, Hkv, G, **rmeta)
    return o


def attention_decode(q, k_cache, v_cache, *, n_valid: int, scale: float):
    """Generated split-KV decode attention; reference: ltmdsl.runtime.ops_attention.attention_decode."""
    return _dispatch("attention_decode", _attention_decode, (q, k_cache, v_cache),
                     dict(n_valid=n_valid, scale=scale), (q, k_cache, v_cache))


# ---------------------------------------------------------------------------------------------
# Causal conv
# ---------------------------------------------------------------------------------------------

def _causal_conv1d(x, weight, bias, *, prev, silu):
    B, T, C = x.shape
    K = weight.shape[1]
    _check_device(x)
    x, weight = _rowmajor(x), _rowmajor(weight)
    if prev is None:
        prev = torch.zeros(B, C, max(K - 1, 1), dtype=x.dtype, device=x.device)
    prev = _rowmajor(prev)
    y = _empty(B, T, C, dtype=x.dtype, device=x.device)
    if T == 0 or B == 0:
        return y
    spec = conv_spec(taps=K, bias=bias is not None, silu=silu, dtype=dtype_name(x.dtype))
    mod = compile_spec(spec).module
    meta = mod.META["causal_conv1d_fwd"]
    grid = (B, _cdiv(T, meta["BLOCK_T"]), _cdiv(C, meta["BLOCK_C"]))
    mod.causal_conv1d_fwd[grid](
        x, weight, bias if bias is not None else weight, prev, y, x.stride(0), x.stride(1), weight.stride(0),
        prev.stride(0), prev.stride(1), y.stride(0), y.stride(1), T, C, **meta)
    return y


def causal_conv1d(x, weight, bias, *, prev, silu: bool):
    """Generated depthwise causal conv; reference: ltmdsl.runtime.ops_conv.causal_conv1d."""
    return _dispatch("causal_conv1d", _causal_conv1d, (x, weight, bias), dict(prev=prev, silu=silu), (x, weight))


def _conv_step(x, state, weight, bias, *, silu):
    B, C = x.shape
    K = weight.shape[1]
    _check_device(x)
    x, weight = _rowmajor(x), _rowmajor(weight)
    work = state if state.stride(-1) == 1 else state.contiguous()
    y = _empty(B, C, dtype=x.dtype, device=x.device)
    spec = conv_spec(taps=K, bias=bias is not None, silu=silu, dtype=dtype_name(x.dtype))
    mod = compile_spec(spec).module
    meta = mod.META["conv_step"]
    mod.conv_step[(B, _cdiv(C, meta["BLOCK_C"]))](
        x, work, weight, bias if bias is not None else weight, y, x.stride(0), work.stride(0), work.stride(1),
        weight.stride(0), y.stride(0), C, **meta)
    if work is not state:
        state.copy_(work)
    return y


def conv_step(x, state, weight, bias, *, silu: bool):
    """Generated conv decode step (state updated in place); reference: ltmdsl.runtime.ops_conv.conv_step."""
    if _supported(x, weight) is None:
        FALLBACKS["conv_step:dtype"] += 1
        return _ref().conv_step(x, state, weight, bias, silu=silu)
    return _conv_step(x, state, weight, bias, silu=silu)


# ---------------------------------------------------------------------------------------------
# Mamba-1 selective scan
# ---------------------------------------------------------------------------------------------

def _selective(u, delta, A, Bm, Cm, state_in, state_out, y, T):
    """Launch the scan kernel over [B, T, Di] views (T = 1 for the step)."""
    Bsz, Di = u.shape[0], u.shape[-1]
    N = A.shape[1]
    spec = selective_scan_spec(d_state=N, dtype=dtype_name(u.dtype))
    mod = compile_spec(spec).module
    meta = mod.META["selective_scan_fwd"]
    st = lambda t: t.stride(1) if t.dim() == 3 else 0  # noqa: E731  time stride (0 for one token)
    mod.selective_scan_fwd[(Bsz, _cdiv(Di, meta["BLOCK_D"]))](
        u, delta, A, Bm, Cm, y, state_in, state_out,
        u.stride(0), st(u), delta.stride(0), st(delta), A.stride(0), Bm.stride(0), st(Bm), Cm.stride(0), st(Cm),
        y.stride(0), st(y), state_in.stride(0), state_in.stride(1), state_out.stride(0), state_out.stride(1),
        T, Di, **meta)


def _selective_scan(u, delta, A, Bm, Cm, *, state):
    Bsz, T, Di = u.shape
    N = A.shape[1]
    _check_device(u)
    u, delta, A, Bm, Cm = (_rowmajor(t) for t in (u, delta, A, Bm, Cm))
    state_in = torch.zeros(Bsz, Di, N, dtype=torch.float32, device=u.device) if state is None else _rowmajor(state)
    final = _empty(Bsz, Di, N, dtype=torch.float32, device=u.device)
    y = _empty(Bsz, T, Di, dtype=u.dtype, device=u.device)
    _selective(u, delta, A, Bm, Cm, state_in, final, y, T)
    return y, final


def selective_scan(u, delta, A, Bm, Cm, *, state):
    """Generated Mamba-1 scan -> (y, final fp32 state); reference: ltmdsl.runtime.ops_scan.selective_scan."""
    return _dispatch("selective_scan", _selective_scan, (u, delta, A, Bm, Cm), dict(state=state),
                     (u, delta, Bm, Cm))


def selective_step(u, delta, A, Bm, Cm, state):
    """Generated Mamba-1 step (state in place); reference: ltmdsl.runtime.ops_scan.selective_step."""
    if _supported(u, delta, Bm, Cm) is None:
        FALLBACKS["selective_step:dtype"] += 1
        return _ref().selective_step(u, delta, A, Bm, Cm, state)
    _check_device(u)
    u, delta, A, Bm, Cm = (_rowmajor(t) for t in (u, delta, A, Bm, Cm))
    work = state if state.stride(-1) == 1 else state.contiguous()
    y = _empty(*u.shape, dtype=u.dtype, device=u.device)
    _selective(u, delta, A, Bm, Cm, work, work, y, 1)
    if work is not state:
        state.copy_(work)
    return y


# ---------------------------------------------------------------------------------------------
# Mamba-2 SSD
# ---------------------------------------------------------------------------------------------

def _ssd_scan(x, dt, A, Bm, Cm, *, chunk, state):
    Bsz, T, Hs, P = x.shape
    G, N = Bm.shape[-2], Bm.shape[-1]
    _check_device(x)
    x, dt, Bm, Cm = (t if t.is_contiguous() else t.contiguous() for t in (x, dt, Bm, Cm))
    dev = x.device
    state_in = torch.zeros(Bsz, Hs, P, N, dtype=torch.float32, device=dev) if state is None else _rowmajor(state)
    final = _empty(Bsz, Hs, P, N, dtype=torch.float32, device=dev)
    y = _empty(Bsz, T, Hs, P, dtype=x.dtype, device=dev)
    if T == 0:
        final.copy_(state_in)
        return y, final
    spec = ssd_spec(head_dim=P, d_state=N, chunk=chunk, dtype=dtype_name(x.dtype))
    mod = compile_spec(spec).module
    m = mod.META
    L = m["ssd_chunk_scan"]["CHUNK"]
    nc = _cdiv(T, L)
    pp, npad = m["ssd_chunk_state"]["P_PAD"], m["ssd_chunk_state"]["N_PAD"]
    acs = _empty(Bsz * Hs, nc, L, dtype=torch.float32, device=dev)
    states = _empty(Bsz * Hs, nc, pp, npad, dtype=torch.float32, device=dev)
    hpg = Hs // G
    mod.ssd_chunk_cumsum[(Bsz * Hs, nc)](dt, A, acs, dt.stride(0), dt.stride(1), T, Hs, nc,
                                          **m["ssd_chunk_cumsum"])
    mod.ssd_chunk_state[(Bsz * Hs, nc)](
        x, dt, Bm, acs, states, *x.stride()[:3], dt.stride(0), dt.stride(1), *Bm.stride()[:3],
        T, Hs, hpg, nc, **m["ssd_chunk_state"])
    sp = m["ssd_state_passing"]
    mod.ssd_state_passing[(Bsz * Hs, pp * npad // sp["BLOCK_S"])](
        states, acs, state_in, final, *state_in.stride()[:3], *final.stride()[:3], Hs, nc, **sp)
    sc = m["ssd_chunk_scan"]
    mod.ssd_chunk_scan[(Bsz * Hs, nc, L // sc["BLOCK_M"])](
        x, dt, Cm, Bm, acs, states, y, *x.stride()[:3], dt.stride(0), dt.stride(1), *Cm.stride()[:3],
        *Bm.stride()[:3], *y.stride()[:3], T, Hs, hpg, nc, **sc)
    return y, final


def ssd_scan(x, dt, A, Bm, Cm, *, chunk: int, state):
    """Generated Mamba-2 SSD chunked scan -> (y, final fp32 state); reference: ltmdsl.runtime.ops_ssd.ssd_scan."""
    return _dispatch("ssd_scan", _ssd_scan, (x, dt, A, Bm, Cm), dict(chunk=chunk, state=state), (x, dt, Bm, Cm))


def ssd_step(x, dt, A, Bm, Cm, state):
    """Generated Mamba-2 step (state in place); reference: ltmdsl.runtime.ops_ssd.ssd_step."""
    if _supported(x, dt, Bm, Cm) is None:
        FALLBACKS["ssd_step:dtype"] += 1
        return _ref().ssd_step(x, dt, A, Bm, Cm, state)
    Bsz, Hs, P = x.shape
    G, N = Bm.shape[-2], Bm.shape[-1]
    _check_device(x)
    x, dt, Bm, Cm = (_rowmajor(t) for t in (x, dt, Bm, Cm))
    work = state if state.stride(-1) == 1 else state.contiguous()
    y = _empty(*x.shape, dtype=x.dtype, device=x.device)
    spec = ssd_spec(head_dim=P, d_state=N, chunk=16, dtype=dtype_name(x.dtype))
    mod = compile_spec(spec).module
    mod.ssd_step[(Bsz * Hs,)](
        x, dt, A, Bm, Cm, work, y, x.stride(0), x.stride(1), dt.stride(0), Bm.stride(0), Bm.stride(1),
        Cm.stride(0), Cm.stride(1), *work.stride()[:3], y.stride(0), y.stride(1), Hs, Hs // G,
        **mod.META["ssd_step"])
    if work is not state:
        state.copy_(work)
    return y


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

def _add_rmsnorm(x, residual, weight, *, eps):
    d = x.shape[-1]
    _check_device(x)
    x2 = x.reshape(-1, d)
    x2 = _rowmajor(x2)
    r2 = _rowmajor(residual.reshape(-1, d)) if residual is not None else None
    M = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = _empty(M, d, dtype=out_dtype, device=x.device)
    s = _empty(M, d, dtype=x.dtype, device=x.device) if residual is not None else x2
    if M:
        spec = rmsnorm_spec(d=d, residual=residual is not None, dtype=dtype_name(x.dtype))
        mod = compile_spec(spec).module
        mod.add_rmsnorm_fwd[(M,)](
            x2, r2 if r2 is not None else x2, weight, y, s, x2.stride(0),
            r2.stride(0) if r2 is not None else 0, y.stride(0), s.stride(0), d, float(eps),
            **mod.META["add_rmsnorm_fwd"])
    summed = s.view(x.shape) if residual is not None else x
    return y.view(x.shape), summed


def add_rmsnorm(x, residual, weight, *, eps: float):
    """Generated fused residual add + RMSNorm -> (normed, summed); reference: ltmdsl.runtime.ops_norm.add_rmsnorm."""
    return _dispatch("add_rmsnorm", _add_rmsnorm, (x, residual, weight), dict(eps=eps), (x, residual))


# ---------------------------------------------------------------------------------------------
# The gated delta rule (Gated DeltaNet, KDA)
# ---------------------------------------------------------------------------------------------

def _delta_unsupported(q, k, v, g, beta) -> bool:
    """True when the inputs have no kernel: q, k, v not one supported dtype, or fp64 gates (the oracle path)."""
    return _supported(q, k, v) is None or torch.float64 in (g.dtype, beta.dtype)


def _delta_spec(q, v, g, chunk: int, l2norm: bool):
    """The spec of a call: head dims from the shapes, a decay per channel when g has one axis more than beta."""
    return gated_delta_spec(head_dim=q.shape[-1], v_head_dim=v.shape[-1], chunk=chunk, per_channel=g.dim() == v.dim(),
                            l2norm=bool(l2norm), dtype=dtype_name(q.dtype))


def _gated_delta_chunked(q, k, v, g, beta, *, chunk, state, l2norm, scale):
    from ltmdsl.runtime.ops_delta import L2NORM_EPS, _check_shapes

    _check_shapes(q, k, v, g, beta)
    Bsz, T, Hv, Dv = v.shape
    Hk, Dk = q.shape[-2:]
    _check_device(q)
    q, k, v, g, beta = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v, g, beta))
    dev = q.device
    state_in = torch.zeros(Bsz, Hv, Dk, Dv, dtype=torch.float32, device=dev) if state is None else _rowmajor(state)
    final = _empty(Bsz, Hv, Dk, Dv, dtype=torch.float32, device=dev)
    o = _empty(Bsz, T, Hv, Dv, dtype=q.dtype, device=dev)
    if T == 0 or Bsz == 0:
        final.copy_(state_in)
        return o, final
    spec = _delta_spec(q, v, g, chunk, l2norm)
    mod = compile_spec(spec).module
    pm, fm = mod.META["gated_delta_prepare"], mod.META["gated_delta_forward"]
    C, dkp, dvp = pm["CHUNK"], pm["DK_PAD"], pm["DV_PAD"]
    nc = _cdiv(T, C)
    scale = Dk ** -0.5 if scale is None else float(scale)
    gamma = _empty(Bsz * Hv, nc, C, dkp if spec["per_channel"] else 1, dtype=torch.float32, device=dev)
    w = _empty(Bsz * Hv, nc, C, dkp, dtype=torch.float32, device=dev)  # the UT transform's W
    u = _empty(Bsz * Hv, nc, C, dvp, dtype=torch.float32, device=dev)  # and U
    qk = _empty(Bsz * Hv, nc, C, C, dtype=torch.float32, device=dev)  # decayed q.k scores within each chunk
    mod.gated_delta_prepare[(Bsz * Hv, nc)](  # q and k are contiguous with one shape: they share strides
        q, k, v, g, beta, gamma, w, u, qk, *q.stride()[:3], *v.stride()[:3], g.stride(0), g.stride(1), g.stride(2),
        beta.stride(0), beta.stride(1), T, Hv, Hv // Hk, nc, scale, L2NORM_EPS, **pm)
    mod.gated_delta_forward[(Bsz * Hv, dvp // fm["BLOCK_V"])](
        q, k, gamma, w, u, qk, o, state_in, final, *q.stride()[:3], *o.stride()[:3], *state_in.stride()[:3],
        *final.stride()[:3], T, Hv, Hv // Hk, nc, scale, L2NORM_EPS, **fm)
    return o, final


def _delta_fallback(name: str, reason: str, chunk: int | None) -> None:
    """Count and say why a delta-rule call runs the PyTorch reference instead of the generated kernels."""
    FALLBACKS[f"{name}:{reason}"] += 1
    why = {"chunk": f"chunk {chunk} is not a power of two, and the generated kernels tile by the chunk",
           "lint": "its kernels fail the lint for this configuration (see ltmdsl.codegen.lint)"}[reason]
    warnings.warn(f"{name}: {why}; running the PyTorch reference (ltmdsl.runtime.ops_delta) instead",
                  RuntimeWarning, stacklevel=3)


def gated_delta_chunked(q, k, v, g, beta, *, chunk: int, state, l2norm: bool, scale: float | None):
    """Generated chunked gated delta rule -> (o in q's dtype, final fp32 state); reference:
    ltmdsl.runtime.ops_delta.gated_delta_chunked (oracle: gated_delta_reference, the token loop).

    Forward only: under autograd the forward runs here and the backward recomputes the reference op
    (`_ReferenceGrad`), so gradients are the reference's. A chunk that is not a power of two, or a
    configuration whose kernels fail the lint, runs the reference with a RuntimeWarning saying why."""
    kwargs = dict(chunk=chunk, state=state, l2norm=l2norm, scale=scale)
    if _delta_unsupported(q, k, v, g, beta):
        FALLBACKS["gated_delta_chunked:dtype"] += 1
        return _ref().gated_delta_chunked(q, k, v, g, beta, **kwargs)
    try:
        delta_kernel_chunk(chunk)
    except KernelSpecError:
        _delta_fallback("gated_delta_chunked", "chunk", chunk)
        return _ref().gated_delta_chunked(q, k, v, g, beta, **kwargs)
    try:
        compile_spec(_delta_spec(q, v, g, chunk, l2norm))
    except LintError:
        _delta_fallback("gated_delta_chunked", "lint", chunk)
        return _ref().gated_delta_chunked(q, k, v, g, beta, **kwargs)
    return _dispatch("gated_delta_chunked", _gated_delta_chunked, (q, k, v, g, beta), kwargs, (q, k, v))


def gated_delta_step(q, k, v, g, beta, state, *, l2norm: bool, scale: float | None):
    """Generated one-token gated delta rule (state updated in place) -> o [B,Hv,Dv] in q's dtype; reference:
    ltmdsl.runtime.ops_delta.gated_delta_step. The step kernel has no chunk, so it always compiles (it is
    rendered with the module of chunk 16)."""
    if _delta_unsupported(q, k, v, g, beta):
        FALLBACKS["gated_delta_step:dtype"] += 1
        return _ref().gated_delta_step(q, k, v, g, beta, state, l2norm=l2norm, scale=scale)
    return _gated_delta_step(q, k, v, g, beta, state, l2norm=l2norm, scale=scale)


def _gated_delta_step(q, k, v, g, beta, state, *, l2norm, scale):
    from ltmdsl.runtime.ops_delta import L2NORM_EPS, _check_shapes

    _check_shapes(q, k, v, g, beta)
    Bsz, Hv, Dv = v.shape
    Hk, Dk = q.shape[-2:]
    _check_device(q)
    q, k = q.contiguous(), k.contiguous()  # [B, Hk, Dk] each: the kernel reads both with q's strides
    v, g, beta = (_rowmajor(t) for t in (v, g, beta))
    work = state if state.stride(-1) == 1 else state.contiguous()
    o = _empty(Bsz, Hv, Dv, dtype=q.dtype, device=q.device)
    mod = compile_spec(_delta_spec(q, v, g, 16, l2norm)).module
    meta = mod.META["gated_delta_step"]
    mod.gated_delta_step[(Bsz * Hv, _cdiv(Dv, meta["BLOCK_V"]))](
        q, k, v, g, beta, work, o, q.stride(0), q.stride(1), v.stride(0), v.stride(1), g.stride(0), g.stride(1),
        beta.stride(0), *work.stride()[:3], o.stride(0), o.stride(1), Hv, Hv // Hk,
        Dk ** -0.5 if scale is None else float(scale), L2NORM_EPS, **meta)
    if work is not state:
        state.copy_(work)
    return o
