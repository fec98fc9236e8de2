"""The norm-then-gate RMSNorm (runtime/ops_norm_gate.py): forward and analytic backward against autograd through
the plain form in float64 (1e-12 forward, 1e-10 gradients: same maths, different association), gradcheck,
transformers' own modules (Qwen3NextRMSNormGated, KimiLinearRMSNormGated) in float64 at 1e-6 (they cast to
fp32 inside), and what the Function saves for backward: o, the gate, the weight and the fp32 rstd only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from ltmdsl.runtime.ops_norm_gate import norm_then_gate, norm_then_gate_reference

F64 = torch.float64
ACTS = {"silu": F.silu, "sigmoid": torch.sigmoid}


def inputs(B=2, T=5, H=3, Dv=4, dtype=F64, seed=0):
    """o, gate [B, T, H, Dv] and a weight [Dv] away from 1 (so dropping it is caught)."""
    gen = torch.Generator().manual_seed(seed)
    o, gate = (torch.randn(B, T, H, Dv, generator=gen, dtype=F64) for _ in range(2))
    weight = 1 + 0.5 * torch.randn(Dv, generator=gen, dtype=F64)
    return o.to(dtype), gate.to(dtype), weight.to(dtype)


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("block", [1, 2, 5, 64], ids=lambda b: f"block{b}")
def test_forward_and_backward_match_the_plain_form(act, block):
    o, gate, weight = inputs()
    fn = ACTS[act]
    dy = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=F64)

    def run(f, **kw):
        leaves = [t.clone().requires_grad_() for t in (o, gate, weight)]
        y = f(*leaves, 1e-6, fn, **kw)
        (y * dy).sum().backward()
        return y.detach(), [t.grad for t in leaves]

    y, g = run(norm_then_gate, block=block)
    ry, rg = run(norm_then_gate_reference)
    assert_close(y, ry, 1e-12, "output")
    for name, a, e in zip(("o", "gate", "weight"), g, rg):
        assert_close(a, e, 1e-10, f"d/d{name}")
    with torch.no_grad():
        assert_close(norm_then_gate(o, gate, weight, 1e-6, fn, block=block), ry, 1e-12, "output without autograd")


@pytest.mark.parametrize("act", sorted(ACTS))
def test_gradcheck(act):
    o, gate, weight = (t.requires_grad_() for t in inputs(B=1, T=3, H=2, Dv=3))
    assert torch.autograd.gradcheck(lambda *a: norm_then_gate(*a, 1e-6, ACTS[act], block=2), (o, gate, weight))


@pytest.mark.parametrize("module,act", [("qwen3_next.modeling_qwen3_next.Qwen3NextRMSNormGated", "silu"),
                                        ("kimi_linear.modeling_kimi_linear.KimiLinearRMSNormGated", "sigmoid")],
                         ids=["qwen3-next", "kimi-linear"])
def test_matches_transformers(module, act):
    path, name = module.rsplit(".", 1)
    cls = getattr(pytest.importorskip(f"transformers.models.{path}"), name)
    o, gate, weight = inputs()
    ref = cls(o.shape[-1], eps=1e-6).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
    dy = torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    ours = [t.clone().requires_grad_() for t in (o, gate, weight)]
    theirs = [t.clone().requires_grad_() for t in (o, gate)]
    y = norm_then_gate(*ours, 1e-6, ACTS[act], block=2)
    ry = ref(*theirs)
    assert_close(y.detach(), ry.detach(), 1e-6, f"vs {name}: output")
    (y * dy).sum().backward()
    (ry * dy).sum().backward()
    for a, e, what in ((ours[0].grad, theirs[0].grad, "d/do"), (ours[1].grad, theirs[1].grad, "d/dgate"),
                       (ours[2].grad, ref.weight.grad, "d/dweight")):
        assert_close(a, e, 1e-6, f"vs {name}: {what}")


def test_saves_only_its_inputs_and_rstd():
    """bf16 o and gate are kept as they are (no fp32 copy of their size), plus rstd [..., 1] in fp32."""
    o, gate, weight = (t.requires_grad_() for t in inputs(dtype=torch.bfloat16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = norm_then_gate(o, gate, weight, 1e-6, F.silu, block=2)
    assert y.dtype == torch.bfloat16
    given = {t.untyped_storage().data_ptr() for t in (o, gate, weight)}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in given]
    assert [(tuple(t.shape), t.dtype) for t in extra] == [((2, 5, 3, 1), torch.float32)]


def test_an_activation_without_a_derivative_is_refused_under_autograd():
    o, gate, weight = (t.requires_grad_() for t in inputs())
    with pytest.raises(ValueError, match="no derivative for the gate activation"):
        norm_then_gate(o, gate, weight, 1e-6, torch.tanh, block=2)
