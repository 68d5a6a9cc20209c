"""benchmarks/gpu_check.py, the one-go GPU checks, imports everywhere and says clearly when there is no CUDA."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run benchmarks/gpu_check.py itself")
def test_without_cuda_it_exits_2_with_one_clear_line(capsys):
    assert load_gpu_check().main([]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1
