"""The benchmarks' frozen-feature probes score every class of a dataset, not only two (the brain MRI
folder has four)."""

from __future__ import annotations

import sys

import pytest
from sklearn.metrics import roc_auc_score

from cass_dist.data.synthetic import build_synthetic


def test_probes_score_a_four_class_set(load_benchmark, tmp_path, monkeypatch):
    study = load_benchmark("cass_vs_baselines")
    helps = sys.modules[study.Bench.__module__]  # where the probe looks compute_metrics up
    s = study.Study(study.parse_args(["--work", str(tmp_path)]), "breastmnist")
    build_synthetic(s.shards, num_images=240, image_size=28, num_classes=4, shard_size=120)
    scored = {}

    def metrics(probs, labels, task):  # keep what the probe scored, to check it against scikit-learn
        scored[len(scored)] = (probs, labels)
        return real_metrics(probs, labels, task=task)

    real_metrics = helps.compute_metrics
    monkeypatch.setattr(helps, "compute_metrics", metrics)
    s.raw_pixels()

    result = s.results["pixels"]
    for i, probe in enumerate(("knn", "linear")):
        probs, labels = scored[i]
        assert probs.shape == (48, 4)  # the test split: 20% of 240, every class a column
        assert result[probe]["auroc_macro"] == pytest.approx(
            roc_auc_score(labels.numpy(), probs.numpy(), multi_class="ovr", average="macro"))
    assert result["knn"]["accuracy"] > 0.5  # four learnable pattern classes: well above chance (0.25)
