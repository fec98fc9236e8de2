"""Weight-decay groups follow each parameter's role (name and shape), not a list of layer kinds."""

import torch
from torch import nn

import ltmdsl
from ltmdsl.train import groups
from train_specs import tiny_spec


def test_tiny_model_split_by_role():
    model = ltmdsl.build(tiny_spec(), seed=0)
    split = groups.split(model)
    no_decay = set(split.no_decay)
    decay = set(split.decay)
    assert not decay & no_decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    for name in no_decay:  # norms, biases, A_log, D, dt_bias
        leaf = name.rsplit(".", 1)[-1]
        assert leaf in ("weight", "bias", "A_log", "D", "dt_bias"), name
    assert "layers.0.mixer.A_log" in no_decay  # Mamba-1's A_log is [Di, N]: a matrix, yet no decay
    assert "layers.2.mixer.A_log" in no_decay and "layers.2.mixer.dt_bias" in no_decay
    assert "layers.0.mixer.D" in no_decay and "layers.0.mixer.dt_proj.bias" in no_decay
    assert "layers.0.norm.weight" in no_decay and "final_norm.weight" in no_decay
    assert "layers.0.mixer.in_proj.weight" in decay and "layers.0.mixer.conv1d.weight" in decay
    assert "layers.3.mixer.experts.gate_proj" in decay  # expert matrices are bare 3-d parameters
    assert "embed.weight" in decay and "lm_head.weight" in decay


def test_marked_parameter_never_decays():
    layer = nn.Linear(4, 4)
    layer.weight._no_weight_decay = True
    assert groups.split(layer) == groups.Groups(decay=(), no_decay=("weight", "bias"))


def test_param_groups_carry_the_decay():
    model = ltmdsl.build(tiny_spec(), seed=0)
    built = groups.param_groups(model, 0.1)
    assert [g["weight_decay"] for g in built] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in built) == len(list(model.parameters()))
    torch.optim.AdamW(built)  # accepted as is
