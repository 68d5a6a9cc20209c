"""kNN and the linear probe: hand computations, probe behaviour and feature gathering."""

from __future__ import annotations

import math

import pytest
import torch

from cass_dist.engine.probe import extract_features, knn_predict, linear_probe, probe_probabilities


def test_knn_equals_hand_computation():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # scale must not matter: cosine
    probs = knn_predict(train, labels, query, num_classes=3, k=2, temperature=0.5)
    # Nearest two: cos 1.0 (class 0) and cos 0.8 (class 1); weights exp(cos / T).
    w0, w1 = math.exp(1.0 / 0.5), math.exp(0.8 / 0.5)
    assert probs[0].tolist() == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1), 0.0], rel=1e-5)


def test_knn_multilabel_is_weighted_share_of_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    probs = knn_predict(train, labels, torch.tensor([[1.0, 0.0]]), num_classes=2, k=2, temperature=1.0)
    w0, w1 = math.exp(1.0), math.exp(0.8)
    assert probs[0].tolist() == pytest.approx([1.0, w1 / (w0 + w1)], rel=1e-5)


def test_knn_bad_inputs():
    feats = torch.randn(5, 3)
    with pytest.raises(ValueError, match="same D"):
        knn_predict(feats, torch.zeros(5, dtype=torch.long), torch.randn(2, 4), num_classes=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        knn_predict(feats, torch.full((5,), 2), feats, num_classes=2)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(feats, torch.zeros(5, dtype=torch.long), feats, num_classes=2, k=0)


def blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    return centres[labels] + torch.randn(n, 4, generator=g), labels


def test_linear_probe_chooses_c_on_val_and_separates_blobs():
    (xt, yt), (xv, yv), (xq, yq) = blobs(120, 0), blobs(60, 1), blobs(60, 2)
    model = linear_probe(xt, yt, xv, yv, Cs=(1e-4, 1.0))
    assert set(model.val_scores_) == {1e-4, 1.0}
    assert model.best_C_ == max(model.val_scores_, key=model.val_scores_.get)
    probs = probe_probabilities(model, xq, 3)
    assert probs.shape == (60, 3) and (probs.argmax(1) == yq.numpy()).mean() > 0.9


def test_linear_probe_multilabel_and_errors():
    x, y = blobs(90, 3)
    multi_hot = torch.stack([y == 0, y != 0], dim=1).float()
    model = linear_probe(x[:60], multi_hot[:60], x[60:], multi_hot[60:], Cs=(1.0,))
    probs = probe_probabilities(model, x[60:], 2)
    assert probs.shape == (30, 2) and ((probs > 0.5) == multi_hot[60:].numpy().astype(bool)).mean() > 0.9
    with pytest.raises(ValueError, match="single class"):
        linear_probe(x, torch.zeros(90, dtype=torch.long), x, y)
    with pytest.raises(ValueError, match="Cs is empty"):
        linear_probe(x, y, x, y, Cs=())


def test_extract_features_covers_every_sample_sorted_by_key():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    images = torch.randn(7, 3, 2, 2)
    keys = [f"val-{i:07d}" for i in (3, 0, 6, 1, 5, 2, 4)]
    batches = [{"image": images[i:i + 3], "label": torch.arange(i, min(i + 3, 7)), "key": keys[i:i + 3]}
               for i in range(0, 7, 3)]
    feats, labels, got_keys = extract_features(backbone, batches)
    assert got_keys == sorted(keys)
    order = [keys.index(k) for k in got_keys]
    assert torch.allclose(feats, backbone(images)[order], atol=1e-6)
    assert labels.tolist() == order
