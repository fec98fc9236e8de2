"""Cache-consistency checks every recurrent mixer must pass, on one module in float64.

A mixer's parallel form and its one-token step must describe one recurrence: for any split of a sequence,
running part of it, keeping the layer's own cache, and running the rest gives the one-shot output. Each
check compares against the module's own one-shot `forward(x)` (no cache), relative error <= TOL (fp64 on
both sides, only the summation order differs):

    prefill(T) == prefill(T - k) + k steps      (`check_prefill_then_steps`)
    chunked prefill == one shot                   (`check_chunked_prefill`, uneven chunk sizes)
    a batch == each sequence alone                (`check_batch_is_per_sequence`)

and `check_gradients_match`: the parallel form's gradients equal the token-loop oracle's.
"""

from __future__ import annotations

import torch
from helpers import assert_close

from ltmdsl.runtime.cache import CacheRequest
from ltmdsl.runtime.kinds import runtime_kind

F64 = torch.float64
TOL = 1e-10


def fresh_cache(module, batch: int, conv_taps: str = "full"):
    """The module's own zeroed cache for `batch` sequences, in float64."""
    req = CacheRequest(batch, 4096, F64, F64, conv_taps, "cpu")
    return runtime_kind(module.cfg.kind).new_cache(module.cfg, req)


def check_prefill_then_steps(module, x: torch.Tensor, k: int, conv_taps: str = "full") -> None:
    """x [B,T,d]: forward(x[:, :T-k]) with a cache, then k `step`s, equals forward(x) without one."""
    T = x.shape[1]
    with torch.no_grad():
        ref = module(x)  # [B, T, d]
        cache = fresh_cache(module, x.shape[0], conv_taps)
        outs = [module(x[:, : T - k], cache, 0)]
        for t in range(T - k, T):
            outs.append(module.step(x[:, t], cache, t)[:, None])
    assert_close(torch.cat(outs, dim=1), ref, TOL, f"prefill({T - k}) + {k} steps vs prefill({T})")


def check_chunked_prefill(module, x: torch.Tensor, sizes: list[int], conv_taps: str = "full") -> None:
    """Prefill in consecutive pieces of `sizes` tokens through one cache equals the one-shot forward."""
    assert sum(sizes) == x.shape[1]
    with torch.no_grad():
        ref = module(x)
        cache = fresh_cache(module, x.shape[0], conv_taps)
        outs, t0 = [], 0
        for n in sizes:
            outs.append(module(x[:, t0 : t0 + n], cache, t0))
            t0 += n
    assert_close(torch.cat(outs, dim=1), ref, TOL, f"chunked prefill {sizes} vs one shot")


def check_batch_is_per_sequence(module, x: torch.Tensor) -> None:
    """Each sequence of a batch gives alone what it gives inside the batch (forward and a cached step)."""
    with torch.no_grad():
        whole = module(x)
        cache = fresh_cache(module, x.shape[0])
        module(x[:, :-1], cache, 0)
        last = module.step(x[:, -1], cache, x.shape[1] - 1)  # [B, d]
        for b in range(x.shape[0]):
            alone = module(x[b : b + 1])
            assert_close(whole[b : b + 1], alone, TOL, f"sequence {b} in a batch vs alone")
            one = fresh_cache(module, 1)
            module(x[b : b + 1, :-1], one, 0)
            assert_close(last[b : b + 1], module.step(x[b : b + 1, -1], one, x.shape[1] - 1), TOL,
                         f"sequence {b}: cached step in a batch vs alone")


def check_gradients_match(fast, slow, x: torch.Tensor) -> None:
    """The parallel form and the token-loop oracle (two modules with the same weights) give the same
    gradients of a random projection of the output, for every parameter and the input (<= TOL)."""
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)  # [B, T, d]
    grads = []
    for module in (fast, slow):
        xi = x.clone().requires_grad_(True)
        module.zero_grad()
        (module(xi) * probe).sum().backward()
        grads.append({"input": xi.grad, **{n: p.grad for n, p in module.named_parameters()}})
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None, f"no gradient for {name}"
        assert_close(g, grads[1][name], TOL, f"gradient of {name}: parallel form vs token loop")
