"""benchmarks/gpu_check.py, the parts that run without a GPU: it imports, parses its arguments, exits with 2
when there is no CUDA device, and its delta-rule correctness check passes on tiny shapes in the interpreter
(the GPU run uses the same code at full size)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture()
def gpu_check(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))  # `say` appends to $OUT/gpu_check.txt
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", [])
    return module


def test_arguments_parse_and_no_device_exits_2(gpu_check, capsys, tmp_path):
    with pytest.raises(SystemExit) as help_exit:
        gpu_check.main(["--help"])
    assert help_exit.value.code == 0 and "--only {all,delta}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "everything"])
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: main() would run the checks")
    assert gpu_check.main(["--only", "delta", "--skip-timing"]) == 2
    assert "no CUDA device" in (tmp_path / "gpu_check.txt").read_text()


def test_delta_correctness_check_passes_on_tiny_shapes(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "DEV", "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        gpu_check.correctness_delta(dtype, cases=[(2, 21, 1, 2, 16, 16, False), (1, 19, 1, 1, 20, 16, True)])
    assert len(gpu_check.RESULTS) == 16 and all(ok for _, ok, _ in gpu_check.RESULTS), gpu_check.RESULTS


def test_the_baseline_is_fla_when_importable_else_none(gpu_check):
    fn = gpu_check.fla_chunk_gated_delta_rule()
    assert fn is None if importlib.util.find_spec("fla") is None else callable(fn)
