"""The one shared assert-close helper: relative error as max|out - ref| / max|ref|.

Tolerances used across the tests: fp32 <= 1e-4 on the CPU, fp16 <= 5e-3, bf16 <= 1e-2.
"""

from __future__ import annotations


def rel_err(actual, expected) -> float:
    """max-abs error scaled by max-abs of the reference; 0 for two all-zero tensors."""
    import torch

    a = torch.as_tensor(actual).double()
    e = torch.as_tensor(expected).double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "output has NaN/Inf (an unwritten element?)"
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
    """Fail unless rel_err(actual, expected) <= rtol; the message names the quantity and the error."""
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what or 'tensor'}: relative error {err:.3e} > {rtol:.1e}"
