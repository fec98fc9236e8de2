"""Model-level settings in the memory model: post-norm parameters and stored inputs, the soft cap's second
copy of the training logits, and scalars that cost nothing."""

from __future__ import annotations

import ltmdsl
from ltmdsl.memory import report

D, V = 64, 1000


def components(settings: str, layer: str, budget: str) -> dict:
    text = (f"model m {{\n vocab = {V}\n d_model = {D}\n {settings}\n layer f = {layer}\n stack {{ f f }}\n}}\n"
            f"budget b for m {{\n {budget}\n on 1 x H100\n}}\n")
    spec = ltmdsl.loads(text)
    return report(spec.model, spec.budgets[0]).per_gpu_components


TRAIN = "training context = 1024, batch = 1, recompute = selective"
INFER = "inference context = 1024"


def test_soft_cap_keeps_a_second_copy_of_the_training_logits():
    plain = components("", "mlp(d_ff = 128)", TRAIN)
    capped = components("logit_cap = 30.0", "mlp(d_ff = 128)", TRAIN)
    assert capped["logits"] - plain["logits"] == 4 * 1024 * V
    assert components("logit_cap = 30.0", "mlp(d_ff = 128)", INFER) == components("", "mlp(d_ff = 128)", INFER)


def test_scalars_cost_nothing():
    scaled = "embed_scale = 8.0\n residual_scale = 0.2\n logit_scale = 0.125\n norm = rmsnorm(zero_centred = true)"
    for budget in (TRAIN, INFER):
        assert components(scaled, "mlp(d_ff = 128)", budget) == components("", "mlp(d_ff = 128)", budget)


def test_post_norm_counts_weights_and_its_stored_input():
    plain = components("", "mlp(d_ff = 128)", TRAIN)
    post = components("", "mlp(d_ff = 128, post_norm = layernorm(eps = 1e-5))", TRAIN)
    assert post["weights"] - plain["weights"] == 2 * 2 * (2 * D)  # bf16 weight and bias [d], two sub-layers
    assert post["activations"] - plain["activations"] == 2 * 2 * 1024 * D  # a * s * h per sub-layer, bf16
