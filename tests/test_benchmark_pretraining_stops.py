"""The benchmark harness never records a pretraining that a signal stopped: a stopped run writes its
summary and checkpoint but no export, so the harness exits, and the same command resumes it."""

from __future__ import annotations

import functools
import json
import signal
import sys

import pytest

from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine.pretrain import build_train_loader, pretrain
from tests._accelerate import reset_accelerate_state
from tests._signals import signals_itself

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]


def test_a_stopped_pretraining_is_not_recorded_and_the_next_call_resumes_it(load_benchmark, tmp_path, monkeypatch):
    study = load_benchmark("cass_vs_baselines")
    args = study.parse_args(["--work", str(tmp_path / "work"), "--steps", "4", "--batch-size", "16"])
    s = study.Study(args, "breastmnist")  # the study's own pretraining argv, at 28 px
    s.cnn, s.vit = "test_resnet", "test_vit"  # only the models shrink, for time
    s.shards = tmp_path / "shards"
    build_synthetic(s.shards, num_images=160, image_size=28, shard_size=80)
    s.train_count = 128
    harness = sys.modules["pretraining_helps"]  # where the study's pretraining call lives
    monkeypatch.setattr(harness, "pretrain", functools.partial(
        pretrain, make_loader=signals_itself(build_train_loader, signal.SIGUSR1, 2)))

    with pytest.raises(SystemExit, match=r"stopped by SIGUSR1 at step 2: run the same command again"):
        s.pretrain("cass", "steps", 0)
    stored = json.loads((tmp_path / "work" / "breastmnist" / "results.json").read_text()) \
        if (tmp_path / "work" / "breastmnist" / "results.json").is_file() else {}
    assert "pretrain/steps/cass/seed0" not in stored and not s.done("pretrain/steps/cass/seed0")

    monkeypatch.setattr(harness, "pretrain", pretrain)  # no signal this time
    reset_accelerate_state()
    out = s.pretrain("cass", "steps", 0)
    assert (out / "export" / "model.json").is_file()
    assert s.results["pretrain/steps/cass/seed0"]["steps"] == 4
    assert s.results["pretrain/steps/cass/seed0"]["machine"] == study.machine()  # where its seconds were measured
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == ""
