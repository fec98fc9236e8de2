"""Checkpoints: safetensors + spec text round trip exactly, tied weights stored once, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from paths import EXAMPLES
from rt_irs import tiny_hybrid_ir

import ltmdsl
from ltmdsl.runtime import checkpoint
from ltmdsl.runtime.build import build

SHARED = """
model shared_ckpt {
    vocab = 32
    d_model = 16
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = tied
    layer a = attention(heads = 2)
    layer f = mlp(d_ff = 32)
    shared block sb { a f }
    stack { sb sb }
}
"""


@pytest.mark.parametrize("spec", [EXAMPLES / "tiny-hybrid.ltm", SHARED], ids=["tiny-hybrid", "shared-block"])
def test_round_trip_is_exact(tmp_path, spec):
    model = build(ltmdsl.load(spec) if isinstance(spec, Path) else ltmdsl.loads(spec), seed=3)
    path = checkpoint.save(model, tmp_path / "ckpt" / "m.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary file left behind
    meta = checkpoint.read_metadata(path)
    assert meta["ltmdsl.spec"] == model.ir.source_text and meta["ltmdsl.model"] == model.ir.name
    back = ltmdsl.load_checkpoint(path)
    assert back.ir.source_hash == model.ir.source_hash
    ids = torch.arange(10)[None] % model.ir.vocab
    assert torch.equal(back(ids), model(ids))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_tied_weights_stored_once(tmp_path):
    from safetensors import safe_open

    model = build(ltmdsl.loads(SHARED))
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys)
    assert "layers.0.mixer.q_proj.weight" in keys and "layers.2.mixer.q_proj.weight" not in keys
    assert "lm_head.weight" not in keys
    assert stored == model.ir.params_total


def test_dtype_is_kept_and_overridable(tmp_path):
    model = build(ltmdsl.loads(SHARED), dtype=torch.bfloat16)
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    assert ltmdsl.load_checkpoint(path).dtype == torch.bfloat16
    assert ltmdsl.load_checkpoint(path, dtype=torch.float32).dtype == torch.float32


def test_refuses_hand_built_ir_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="source_text"):
        checkpoint.save(build(tiny_hybrid_ir()), tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an ltmdsl checkpoint"):
        ltmdsl.load_checkpoint(tmp_path / "foreign.safetensors")


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    model = build(ltmdsl.loads(SHARED))
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(build(ltmdsl.loads(SHARED), seed=9), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---- hostile files: checked from the header before anything is allocated ----------------------------

def _forge(path, tensors: dict, metadata: dict, data_bytes: int | None = None):
    """A safetensors file with this header; its data is a hole (sparse) of the declared size."""
    import json
    import struct

    header, offset = {"__metadata__": metadata}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + (offset if data_bytes is None else data_bytes))
    return path


def _ckpt_meta(text, model, dtype="float32"):
    return {"ltmdsl.spec": text, "ltmdsl.model": model, "ltmdsl.dtype": dtype}


def _expected(ir, code="F32", size=4):
    with torch.device("meta"):
        from ltmdsl.runtime.model import LTModel
        from ltmdsl.runtime.kernels import TORCH_KERNELS

        net = LTModel(ir, TORCH_KERNELS)
    return {n: (code, tuple(p.shape), p.numel() * size) for n, p in net.named_parameters()}


def test_a_tiny_file_declaring_a_huge_model_allocates_nothing(tmp_path):
    import resource

    text = (EXAMPLES / "llama-3.1-405b.ltm").read_text()
    path = _forge(tmp_path / "huge.safetensors", {"w": ("F32", (1,), 4)}, _ckpt_meta(text, "llama_3_1_405b"))
    assert path.stat().st_size < 20_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="tensors do not match"):
        ltmdsl.load_checkpoint(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: far below 1.6 TB


def test_a_model_larger_than_memory_is_refused(tmp_path):
    spec = ltmdsl.load(EXAMPLES / "llama-3.1-8b.ltm")
    ir = spec.model
    try:  # every tensor right, 32 GB of declared data in a sparse file
        path = _forge(tmp_path / "big.safetensors", _expected(ir), _ckpt_meta(spec.text, ir.name))
    except OSError:
        pytest.skip("no sparse files here")
    from ltmdsl import tensorfile

    if (tensorfile.available_bytes() or 0) > ir.params_total * 4:
        pytest.skip("this machine could hold the model")
    with pytest.raises(ValueError, match="GiB of memory available"):
        ltmdsl.load_checkpoint(path)


def test_memory_check_uses_available_memory(tmp_path, monkeypatch):
    from ltmdsl import tensorfile

    model = build(ltmdsl.loads(SHARED))
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    monkeypatch.setattr(tensorfile, "available_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="only 0.00 GiB of memory available"):
        ltmdsl.load_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    (lambda t: {**t, "layers.0.norm.weight": ("F32", (7,), 28)}, "has shape"),
    (lambda t: {**t, "layers.0.norm.weight": ("I32", t["layers.0.norm.weight"][1], t["layers.0.norm.weight"][2])},
     "is I32"),
    (lambda t: {k: v for k, v in t.items() if k != "embed.weight"}, "missing \\['embed.weight'\\]"),
    (lambda t: {**t, "extra": ("F32", (1,), 4)}, "unexpected \\['extra'\\]"),
], ids=["shape", "dtype", "missing", "unexpected"])
def test_forged_headers_are_refused_by_name_shape_and_dtype(tmp_path, change, message):
    spec = ltmdsl.loads(SHARED)
    path = _forge(tmp_path / "f.safetensors", change(_expected(spec.model)), _ckpt_meta(SHARED, spec.model.name))
    with pytest.raises(ValueError, match=message):
        ltmdsl.load_checkpoint(path)


@pytest.mark.parametrize("header", [b"\xff" * 8, (10**9).to_bytes(8, "little"), (5).to_bytes(8, "little") + b"[1,2]",
                                    (2).to_bytes(8, "little") + b"{}" + b"\0" * 4],
                         ids=["huge-length", "length-past-end", "not-an-object", "no-spec"])
def test_malformed_files_are_clear_errors(tmp_path, header):
    (tmp_path / "bad.safetensors").write_bytes(header)
    with pytest.raises(ValueError, match="safetensors|ltmdsl checkpoint"):
        ltmdsl.load_checkpoint(tmp_path / "bad.safetensors")


def test_offsets_outside_the_file_are_refused(tmp_path):
    spec = ltmdsl.loads(SHARED)
    path = _forge(tmp_path / "f.safetensors", _expected(spec.model), _ckpt_meta(SHARED, spec.model.name), data_bytes=16)
    with pytest.raises(ValueError, match="outside the file"):
        ltmdsl.load_checkpoint(path)


@pytest.mark.parametrize("dtype", ["", "int8", "float8_e4m3fn", "complex64", "torch.float32"])
def test_non_float_or_unknown_dtype_metadata_is_refused(tmp_path, dtype):
    spec = ltmdsl.loads(SHARED)
    path = _forge(tmp_path / "f.safetensors", _expected(spec.model), _ckpt_meta(SHARED, spec.model.name, dtype))
    with pytest.raises(ValueError, match="ltmdsl.dtype is"):
        ltmdsl.load_checkpoint(path)


def test_unknown_model_name_is_refused(tmp_path):
    spec = ltmdsl.loads(SHARED)
    path = _forge(tmp_path / "f.safetensors", _expected(spec.model), _ckpt_meta(SHARED, "nope"))
    with pytest.raises(ValueError, match="ltmdsl.model is 'nope'"):
        ltmdsl.load_checkpoint(path)


def test_embedded_use_is_refused(tmp_path):
    (tmp_path / "lib.ltm").write_text("const v = 2\n")
    text = f'use "{tmp_path / "lib.ltm"}"\n' + SHARED
    spec = ltmdsl.loads(SHARED)
    path = _forge(tmp_path / "f.safetensors", _expected(spec.model), _ckpt_meta(text, spec.model.name))
    with pytest.raises(ValueError, match="`use` statement"):
        ltmdsl.load_checkpoint(path)


def test_nan_weights_warn_naming_the_tensors(tmp_path):
    model = build(ltmdsl.loads(SHARED))
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
        model.layers[0].norm.weight[0] = float("inf")
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    with pytest.warns(RuntimeWarning, match="NaN or inf in 2 tensors: embed.weight, layers.0.norm.weight"):
        ltmdsl.load_checkpoint(path)


def test_finite_weights_do_not_warn(tmp_path):
    import warnings

    path = checkpoint.save(build(ltmdsl.loads(SHARED)), tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ltmdsl.load_checkpoint(path)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_non_files_are_refused_without_hanging(tmp_path, kind):
    path = tmp_path / "x.safetensors"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(ValueError, match="not a regular file|cannot read"):
        ltmdsl.load_checkpoint(path)


def test_saving_to_an_unwritable_place_names_the_file(tmp_path):
    model = build(ltmdsl.loads(SHARED))
    with pytest.raises(OSError, match="cannot write checkpoint /proc/x/m.safetensors"):
        checkpoint.save(model, "/proc/x/m.safetensors")


SELECTION_BIAS = """
model biased_moe {
    vocab = 32
    d_model = 16
    dtype = fp32
    layer a = attention(heads = 2)
    layer e = moe(experts = 4, top_k = 1, d_ff = 8, routing = sigmoid_topk_renorm, selection_bias = true,
                  shared_d_ff = 8)
    stack { a e }
}
"""


def test_selection_bias_buffer_round_trips(tmp_path):
    """The MoE's selection bias is a buffer (not a parameter, as transformers counts it) and is saved too."""
    model = build(ltmdsl.loads(SELECTION_BIAS), seed=3)
    bias = model.layers[1].mixer.selection_bias
    with torch.no_grad():
        bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))  # every token now chooses expert 1
    back = ltmdsl.load_checkpoint(checkpoint.save(model, tmp_path / "m.safetensors"))
    assert torch.equal(back.layers[1].mixer.selection_bias, bias)
    assert back.num_parameters() == model.ir.params_total  # the buffer is stored, not counted
    ids = torch.arange(10)[None] % 32
    assert torch.equal(back(ids), model(ids))
