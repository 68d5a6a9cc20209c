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

pytestmark = pytest.mark.slow  # trains, twice per case


def args(shards, out, *extra):
    return ["--data", str(shards), "--init", "random", "--branch", "cnn", "--batch-size", "16", "--image-size", "32",
            "--precision", "fp32", "--label-fraction", "0.25", "--max-steps", "4", "--eval-every", "2",
            "--lr", "0.001", "--log-every", "1", "--data.train_transform", "eval", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("extra, stop_after", [((), 1), (("--freeze-backbone-steps", "2"), 2)],
                         ids=["plain", "resumed-at-the-unfreeze-point"])
def test_resume_after_signal_equals_straight_run(syn_shards, tmp_path, monkeypatch, extra, stop_after):
    # With a frozen phase the run stops on its last frozen step: the resumed run unfreezes, and its
    # checkpoint holds no optimizer state for the backbone yet.
    straight = finetune(parse_finetune_config(args(syn_shards, tmp_path / "straight", *extra)))

    calls = []
    real_should_stop = Run.should_stop

    def stop_once(self, *args):  # as if SIGUSR1 arrived during step `stop_after`
        calls.append(1)
        if len(calls) == stop_after:
            self._stop_signal = "SIGUSR1"
        return real_should_stop(self, *args)

    monkeypatch.setattr(Run, "should_stop", stop_once)
    assert finetune(parse_finetune_config(args(syn_shards, tmp_path / "resumed", *extra))) == {}
    assert not (tmp_path / "resumed/metrics.json").exists()
    monkeypatch.setattr(Run, "should_stop", real_should_stop)
    resumed = finetune(parse_finetune_config(args(syn_shards, tmp_path / "resumed", *extra, "--resume", "auto")))

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
