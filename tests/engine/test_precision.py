"""Precision choice: bf16 on >= 8.0 GPUs, fp16 + loss scaling on 7.x (T4/V100), fp32 on CPU."""

import pytest
import torch

from cass_dist.engine import run as run_module
from cass_dist.engine.run import _wandb_offline_reason, choose_precision


def fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), "fp16"),  # T4
    ((7, 0), "fp16"),  # V100
    ((8, 0), "bf16"),  # A100
    ((9, 0), "bf16"),  # H100
    ((6, 1), "fp32"),  # Pascal: no fast half precision
    (None, "fp32"),    # CPU
])
def test_auto_precision_follows_compute_capability(monkeypatch, capability, expected):
    fake_gpu(monkeypatch, capability)
    precision, why = choose_precision("auto")
    assert precision == expected
    if capability == (7, 5):
        assert "loss scaling" in why and "7.5" in why  # the log says why fp16 was chosen


def test_explicit_precision_wins(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    assert choose_precision("fp32")[0] == "fp32"
    assert choose_precision("bf16")[0] == "bf16"
    with pytest.raises(ValueError, match="run.precision"):
        choose_precision("fp8")


def test_wandb_goes_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert "offline" in _wandb_offline_reason()  # never a login prompt or a network wait
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert _wandb_offline_reason() is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run_module._wandb_offline_reason() is None  # the user's explicit mode is respected
