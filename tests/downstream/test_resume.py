"""A fine-tuning run stopped by a signal and resumed ends exactly like an uninterrupted one.

Training augmentation is off here (``data.train_transform eval``): the random augmentations draw from
the global torch RNG, and a fresh DataLoader iterator on resume draws from it once more, so augmented
batches after a resume differ from the uninterrupted run's (a data-layer matter, reported).
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from cass_dist.configs.finetune import parse_finetune_config
from cass_dist.engine.finetune import finetune
from cass_dist.engine.run import Run


def args(shards, out, *extra):
    return ["--data", str(shards), "--init", "random", "--branch", "cnn", "--batch-size", "16", "--image-size", "32",
            "--precision", "fp32", "--label-fraction", "0.25", "--max-steps", "4", "--eval-every", "2",
            "--lr", "0.001", "--log-every", "1", "--data.train_transform", "eval", "--output-dir", str(out), *extra]


def test_resume_after_signal_equals_straight_run(syn_shards, tmp_path, monkeypatch):
    straight = finetune(parse_finetune_config(args(syn_shards, tmp_path / "straight")))

    calls = []
    real_should_stop = Run.should_stop

    def stop_once(self, *args):  # as if SIGUSR1 arrived during the first step
        calls.append(1)
        if len(calls) == 1:
            self._stop_signal = "SIGUSR1"
        return real_should_stop(self, *args)

    monkeypatch.setattr(Run, "should_stop", stop_once)
    assert finetune(parse_finetune_config(args(syn_shards, tmp_path / "resumed"))) == {}
    assert not (tmp_path / "resumed/metrics.json").exists()
    monkeypatch.setattr(Run, "should_stop", real_should_stop)
    resumed = finetune(parse_finetune_config(args(syn_shards, tmp_path / "resumed", "--resume", "auto")))

    assert resumed["steps"] == straight["steps"] == 4
    assert resumed["best_step"] == straight["best_step"]
    assert resumed["test"]["confusion_matrix"] == straight["test"]["confusion_matrix"]
    assert resumed["test"]["auroc_macro"] == pytest.approx(straight["test"]["auroc_macro"])
    a = load_file(str(tmp_path / "straight/best/classifier.safetensors"))
    b = load_file(str(tmp_path / "resumed/best/classifier.safetensors"))
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    losses = [[json.loads(line).get("train_loss") for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("straight", "resumed")]
    assert [x for x in losses[0] if x is not None] == pytest.approx([x for x in losses[1] if x is not None], rel=1e-5)
