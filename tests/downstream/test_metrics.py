"""Metrics equal scikit-learn's on the same predictions, on one rank and gathered from two."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    roc_auc_score,
)

from cass_dist.metrics import compute_metrics, gather_predictions, write_metrics
from tests.distributed._ranks import free_port
from tests.downstream._dist_worker import make_predictions

REPO = Path(__file__).resolve().parents[2]


def sklearn_reference(task: str, probs: torch.Tensor, labels: torch.Tensor) -> dict:
    p, y = probs.numpy(), labels.numpy()
    if task == "multi-label":
        pred = (p >= 0.5).astype(int)
        return {
            "f1_macro": f1_score(y, pred, average="macro"),
            "accuracy": accuracy_score(y, pred),
            "auroc_macro": roc_auc_score(y, p, average="macro"),
            "confusion_matrix": multilabel_confusion_matrix(y, pred).tolist(),
        }
    pred = p.argmax(1)
    auroc = roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(y, p, multi_class="ovr")
    return {
        "f1_macro": f1_score(y, pred, average="macro"),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "auroc_macro": auroc,
        "confusion_matrix": confusion_matrix(y, pred).tolist(),
    }


def assert_matches(ours: dict, reference: dict) -> None:
    for name, expected in reference.items():
        if name == "confusion_matrix":
            assert ours[name] == expected
        else:
            assert ours[name] == pytest.approx(expected, abs=1e-12), name


@pytest.mark.parametrize("task,classes", [("multi-class", 4), ("binary", 2), ("multi-label", 4)])
def test_single_rank_equals_sklearn(task, classes):
    probs, labels, _ = make_predictions(task, num_classes=classes)
    ours = compute_metrics(probs, labels, task=task)
    assert_matches(ours, sklearn_reference(task, probs, labels))
    assert ours["num_samples"] == len(labels)
    assert ours["notes"] == []


def test_per_class_f1_and_multilabel_balanced_accuracy():
    probs, labels, _ = make_predictions("multi-label")
    ours = compute_metrics(probs, labels, task="multi-label")
    pred = (probs.numpy() >= 0.5).astype(int)
    y = labels.numpy().astype(int)
    assert ours["f1_per_class"] == pytest.approx(f1_score(y, pred, average=None).tolist())
    per_label = [balanced_accuracy_score(y[:, c], pred[:, c]) for c in range(y.shape[1])]
    assert ours["balanced_accuracy"] == pytest.approx(np.mean(per_label))


def test_class_absent_from_labels_gives_nan_auroc_and_a_note(tmp_path):
    probs, labels, _ = make_predictions("multi-class")
    keep = labels != 3
    ours = compute_metrics(probs[keep], labels[keep], task="multi-class", class_names=["a", "b", "c", "d"])
    assert math.isnan(ours["auroc_per_class"][3])
    assert any("'d'" in note for note in ours["notes"])
    present = [roc_auc_score(labels[keep] == c, probs[keep][:, c]) for c in range(3)]
    assert ours["auroc_macro"] == pytest.approx(np.mean(present))
    write_metrics(tmp_path / "metrics.json", ours)
    assert json.loads((tmp_path / "metrics.json").read_text())["auroc_per_class"][3] is None


def test_bad_inputs_raise():
    probs, labels, _ = make_predictions("multi-class")
    with pytest.raises(ValueError, match="task"):
        compute_metrics(probs, labels, task="regression")
    with pytest.raises(ValueError, match="N labels"):
        compute_metrics(probs, labels[:-1], task="multi-class")
    with pytest.raises(ValueError, match="class ids"):
        compute_metrics(probs, labels + 4, task="multi-class")
    with pytest.raises(ValueError, match="class names"):
        compute_metrics(probs, labels, task="multi-class", class_names=["a"])
    with pytest.raises(ValueError, match="no rank"):
        gather_predictions(None, None, None, [])


def test_single_process_gather_sorts_by_key():
    probs, labels, keys = make_predictions("multi-class")
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(1))
    got = gather_predictions(None, probs[order], labels[order], [keys[i] for i in order])
    assert got[2] == keys
    assert torch.equal(got[0], probs) and torch.equal(got[1], labels)


def test_two_ranks_equal_one(tmp_path):
    out = tmp_path / "gathered.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "tests/downstream/_dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered = json.loads(out.read_text())
    assert gathered["world_size"] == 2
    for task, classes in (("multi-class", 4), ("binary", 2), ("multi-label", 4)):
        probs, labels, keys = make_predictions(task, num_classes=classes)
        single = compute_metrics(probs, labels, task=task)
        assert gathered[task]["gathered_keys"] == keys
        assert gathered[task]["confusion_matrix"] == single["confusion_matrix"]
        for name in ("f1_macro", "f1_per_class", "accuracy", "balanced_accuracy", "auroc_macro"):
            assert gathered[task][name] == pytest.approx(single[name], abs=1e-12), (task, name)
    probs, labels, _ = make_predictions("multi-class")
    assert gathered["one_rank_empty"]["f1_macro"] == pytest.approx(compute_metrics(probs, labels, task="multi-class")["f1_macro"])
