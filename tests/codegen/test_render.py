"""Rendering: every template x feature combination renders, parses and passes the lint; snapshots;
keys; byte-identical output; hostile names and values are refused before they reach a template."""

import ast
import itertools
import os
from pathlib import Path

import pytest

from ltmdsl.codegen.cache import kernel_key
from ltmdsl.codegen.kernelspec import (
    FAMILIES,
    KernelSpec,
    KernelSpecError,
    attention_decode_spec,
    attention_spec,
    conv_spec,
    delta_kernel_chunk,
    gated_delta_spec,
    rmsnorm_spec,
    selective_scan_spec,
    ssd_spec,
)
from ltmdsl.codegen.lint import lint
from ltmdsl.codegen.render import TEMPLATES, render

GOLDEN = Path(__file__).parent / "golden"


def all_feature_specs():
    for g, d, dv, causal, window, dtype, up in itertools.product(
            [1, 3, 4, 8], [64, 128, 80], [None, 48], [True, False], [True, False], ["bf16", "fp32"], [False, True]):
        yield attention_spec(group=g, head_dim=d, v_head_dim=dv or d, causal=causal, window=window,
                             dtype=dtype, upcast=up)
    for g, d, dtype, up in itertools.product([1, 4, 16], [64, 128, 96, 256], ["bf16", "fp16", "fp32"], [False, True]):
        yield attention_decode_spec(group=g, head_dim=d, v_head_dim=d, dtype=dtype, upcast=up)
    for k, bias, silu, dtype in itertools.product([2, 4, 3], [True, False], [True, False], ["bf16", "fp32"]):
        yield conv_spec(taps=k, bias=bias, silu=silu, dtype=dtype, upcast=False)
    for n, dtype in itertools.product([8, 16, 12], ["bf16", "fp32"]):
        yield selective_scan_spec(d_state=n, dtype=dtype, upcast=False)
    for p, n, c, dtype, up in itertools.product([64, 32, 80], [16, 128, 12], [16, 256, 100], ["bf16", "fp32"],
                                               [False, True]):
        yield ssd_spec(head_dim=p, d_state=n, chunk=c, dtype=dtype, upcast=up)
    for d, res, dtype in itertools.product([64, 96, 4096], [True, False], ["bf16", "fp32"]):
        yield rmsnorm_spec(d=d, residual=res, dtype=dtype, upcast=False)
    for dk, dv, c, per_channel in itertools.product([16, 128, 80], [None, 48], [8, 64], [False, True]):
        # the dtype only names the module (every product is fp32): it alternates with l2norm
        yield gated_delta_spec(head_dim=dk, v_head_dim=dv or dk, chunk=c, per_channel=per_channel, l2norm=c == 64,
                               dtype="bf16" if dv else "fp32", upcast=False)


def test_every_family_and_feature_renders_parses_and_lints():
    specs = list(all_feature_specs())
    assert {s.family for s in specs} == set(FAMILIES) == set(TEMPLATES)
    failures = []
    for spec in specs:
        source = render(spec)
        ast.parse(source)
        problems, reports = lint(source, spec["dtype"])
        if problems:
            failures.append((spec.name, problems))
        assert reports, spec.name  # every module holds at least one kernel
    assert not failures, failures[:5]


def test_features_change_the_code_not_just_the_header():
    body = lambda s: render(s).split('"""', 1)[1]  # noqa: E731
    base = dict(group=4, head_dim=64, v_head_dim=64, dtype="bf16", upcast=False)
    causal = body(attention_spec(causal=True, window=False, **base))
    windowed = body(attention_spec(causal=True, window=True, **base))
    assert "window" not in causal.split("import triton", 1)[1]
    assert "q_pos[:, None] - window" in windowed
    assert "offs_n[None, :] <= q_pos[:, None]" not in body(attention_spec(causal=False, window=False, **base))
    assert 'input_precision="ieee"' in body(attention_spec(causal=True, window=False, **dict(base, dtype="fp32")))
    assert ".to(tl.float32)" in body(attention_spec(causal=True, window=False, **dict(base, upcast=True)))
    assert "tl.sigmoid" not in body(conv_spec(taps=4, bias=False, silu=False, dtype="bf16", upcast=False))
    delta = dict(head_dim=128, v_head_dim=128, chunk=64, dtype="bf16", upcast=False)
    per_head = body(gated_delta_spec(per_channel=False, l2norm=True, **delta))
    per_channel = body(gated_delta_spec(per_channel=True, l2norm=True, **delta))
    assert "BLOCK_C" not in per_head and "seg = gam_c[:, None, :] - gam_c[None, :, :]" in per_channel
    assert "tl.sqrt" not in body(gated_delta_spec(per_channel=False, l2norm=False, **delta))
    # fp32 dots: IEEE for fp32 models and under the interpreter, TF32 (exact for bf16 / fp16 inputs) otherwise
    assert 'input_precision="tf32"' in per_head and 'input_precision="ieee"' not in per_head
    for other in (dict(delta, dtype="fp32"), dict(delta, upcast=True)):
        assert 'input_precision="tf32"' not in body(gated_delta_spec(per_channel=False, l2norm=True, **other))


def test_delta_kernels_tile_by_a_power_of_two_chunk_of_at_least_16():
    assert [delta_kernel_chunk(c) for c in (1, 8, 16, 64, 128)] == [16, 16, 16, 64, 128]
    for bad in (48, 0, -16, True, 16.0):
        with pytest.raises(KernelSpecError, match="power of two"):
            delta_kernel_chunk(bad)


def test_same_spec_renders_byte_identical_and_keys_differ():
    a = ssd_spec(head_dim=64, d_state=128, chunk=256, dtype="bf16", upcast=False)
    b = ssd_spec(head_dim=64, d_state=128, chunk=256, dtype="bf16", upcast=False)
    assert a == b and hash(a) == hash(b)
    assert render(a) == render(b)
    keys = {kernel_key(render(s)) for s in [
        a,
        ssd_spec(head_dim=64, d_state=64, chunk=256, dtype="bf16", upcast=False),
        ssd_spec(head_dim=64, d_state=128, chunk=128, dtype="bf16", upcast=False),
        ssd_spec(head_dim=64, d_state=128, chunk=256, dtype="fp32", upcast=False),
        ssd_spec(head_dim=64, d_state=128, chunk=256, dtype="bf16", upcast=True),
    ]}
    assert len(keys) == 5


def test_header_names_version_spec_hash_and_parameters():
    from ltmdsl import __version__

    spec = rmsnorm_spec(d=96, residual=True, dtype="bf16", upcast=False)
    head = render(spec).splitlines()[:4]
    assert head[0].startswith(f"# Generated by ltmdsl {__version__} from codegen/templates/rmsnorm.jinja")
    assert head[2] == f"# spec hash: {spec.spec_hash}"
    assert "block_d=128" in head[3] and "residual=True" in head[3]


GOLDEN_SPECS = {
    "attention_g4_d128_causal_window_bf16": lambda: attention_spec(
        group=4, head_dim=128, v_head_dim=128, causal=True, window=True, dtype="bf16", upcast=False),
    "attention_decode_g4_d128_bf16": lambda: attention_decode_spec(
        group=4, head_dim=128, v_head_dim=128, dtype="bf16", upcast=False),
    "ssd_d64_n128_c256_bf16": lambda: ssd_spec(head_dim=64, d_state=128, chunk=256, dtype="bf16", upcast=False),
    "rmsnorm_residual_bf16": lambda: rmsnorm_spec(d=4096, residual=True, dtype="bf16", upcast=False),
    "gated_delta_d128_c64_l2norm_bf16": lambda: gated_delta_spec(
        head_dim=128, v_head_dim=128, chunk=64, per_channel=False, l2norm=True, dtype="bf16", upcast=False),
    "gated_delta_d128_c64_per_channel_l2norm_bf16": lambda: gated_delta_spec(
        head_dim=128, v_head_dim=128, chunk=64, per_channel=True, l2norm=True, dtype="bf16", upcast=False),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_SPECS))
def test_golden_snapshot(name):
    """Generated code is reviewed as text: a template change shows up as a snapshot diff.
    Regenerate with LTMDSL_UPDATE_GOLDEN=1 after checking the diff."""
    spec = GOLDEN_SPECS[name]()
    assert spec.name == name
    path = GOLDEN / f"{name}.py"
    source = render(spec)
    if os.environ.get("LTMDSL_UPDATE_GOLDEN") == "1":
        path.write_text(source)
    assert path.exists(), f"missing snapshot {path}; run with LTMDSL_UPDATE_GOLDEN=1"
    assert source == path.read_text(), f"{name} differs from its snapshot"


HOSTILE = [
    ("attention", dict(dtype='bf16"); import os; os.system("x")#')),
    ("attention", dict(dtype="{{ 7*7 }}")),
    ("attention", dict(dtype="BF16")),
    ("attention", dict(group="4")),
    ("attention", dict(group=True)),
    ("attention", dict(group=4.0)),
    ("attention", dict(group=-4)),
    ("attention", dict(block_m=48)),  # not a power of two
    ("attention", dict(head_dim_pad=32)),  # smaller than head_dim
    ("attention", dict(causal=1)),
    ("attention", dict(__import__=1)),
    ("attention", dict(evil_param=1)),
    ("rmsnorm", dict(block_d=float("nan"))),
    ("rmsnorm", dict(dtype="fp8")),
    ("gated_delta", dict(chunk=48)),  # the kernels tile by the chunk: a power of two
    ("gated_delta", dict(per_channel=1)),
    ("gated_delta", dict(v_head_dim_pad=16)),  # smaller than v_head_dim
]


@pytest.mark.parametrize("family,override", HOSTILE, ids=[f"{f}-{list(o)[0]}-{i}" for i, (f, o) in enumerate(HOSTILE)])
def test_hostile_parameters_are_refused(family, override):
    good = {
        "attention": lambda: attention_spec(group=4, head_dim=64, v_head_dim=64, causal=True, window=False,
                                            dtype="bf16", upcast=False),
        "rmsnorm": lambda: rmsnorm_spec(d=64, residual=True, dtype="bf16", upcast=False),
        "gated_delta": lambda: gated_delta_spec(head_dim=64, v_head_dim=64, chunk=64, per_channel=False, l2norm=True,
                                                dtype="bf16", upcast=False),
    }[family]()
    params = dict(good.params)
    params.update(override)
    with pytest.raises(KernelSpecError):
        KernelSpec(family, tuple(sorted(params.items())))


@pytest.mark.parametrize("family", ["../../etc/passwd", "attention\n", "Attention", "__class__", ""])
def test_hostile_family_names_are_refused(family):
    with pytest.raises(KernelSpecError):
        KernelSpec(family, ())


def test_render_refuses_anything_but_a_kernelspec():
    with pytest.raises(KernelSpecError):
        render({"family": "rmsnorm", "dtype": "bf16"})
    spec = rmsnorm_spec(d=64, residual=True, dtype="bf16", upcast=False)
    object.__setattr__(spec, "params", spec.params + (("zz", "x'); os.system('id"),))  # bypassing validation
    with pytest.raises(KernelSpecError):
        render(spec)


def test_unsorted_or_duplicate_params_are_refused():
    spec = rmsnorm_spec(d=64, residual=True, dtype="bf16", upcast=False)
    with pytest.raises(KernelSpecError):
        KernelSpec("rmsnorm", tuple(reversed(spec.params)))
    with pytest.raises(KernelSpecError):
        KernelSpec("rmsnorm", spec.params + (spec.params[-1],))
