"""Collapse monitor: statistics on known batches; the warning fires on collapse and only then."""

import math

import pytest
import torch

from cass_dist.monitor import CollapseMonitor, embedding_stats


def test_stats_of_orthonormal_and_identical_batches():
    eye = torch.eye(16)
    stats = embedding_stats(eye * 3.0)
    assert stats["eff_rank"] == pytest.approx(16.0, rel=1e-4)
    assert stats["offdiag_cos"] == pytest.approx(0.0, abs=1e-6)
    same = embedding_stats(torch.ones(16, 16))
    assert same["eff_rank"] == pytest.approx(1.0, abs=1e-3)
    assert same["std"] == pytest.approx(0.0, abs=1e-6)
    assert same["offdiag_cos"] == pytest.approx(1.0, abs=1e-6)


def test_healthy_std_is_about_one_over_sqrt_d():
    torch.manual_seed(0)
    stats = embedding_stats(torch.randn(512, 256))
    assert stats["std"] == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert stats["eff_rank"] > 100


def test_monitor_fires_on_collapse_and_stays_silent_when_healthy():
    torch.manual_seed(0)
    healthy = embedding_stats(torch.randn(128, 64))
    collapsed = embedding_stats(torch.randn(1, 64) + 1e-4 * torch.randn(128, 64))
    monitor = CollapseMonitor()
    assert monitor.update(healthy, healthy) is None
    warning = monitor.update(healthy, collapsed)
    assert warning is not None and "vit" in warning and "cnn" not in warning
    assert monitor.update(healthy, collapsed) is None  # still collapsed: not repeated
    assert monitor.collapsed == {"cnn": False, "vit": True}
    assert monitor.update(healthy, healthy) is None
    assert "cnn" in monitor.update(collapsed, healthy)


def test_monitor_fires_on_low_rank_even_with_spread():
    torch.manual_seed(0)
    two_points = torch.randn(2, 64).repeat(64, 1)  # std is large, but only one direction pair
    stats = embedding_stats(two_points)
    assert CollapseMonitor(min_eff_rank=2.5).is_collapsed(stats)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="B >= 2"):
        embedding_stats(torch.randn(1, 8))
    with pytest.raises(ValueError, match="std_fraction"):
        CollapseMonitor(std_fraction=2.0)
