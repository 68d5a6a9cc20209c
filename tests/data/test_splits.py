"""Split properties: stratification, groups, determinism, duplicates, label fractions."""

from collections import Counter

import numpy as np
import pytest

from cass_dist.data.splits import cross_split_duplicates, select_label_fraction, stratified_split


def _labels(counts):
    rng = np.random.default_rng(1)
    return [int(x) for x in rng.permutation(np.repeat(np.arange(len(counts)), counts))]


def test_stratified_split_keeps_class_proportions():
    counts = [500, 120, 37, 10, 3]
    labels = _labels(counts)
    splits = stratified_split(labels, seed=0)
    assert set(splits) == {"train", "val", "test"}
    for c, n in enumerate(counts):
        per = Counter(s for s, y in zip(splits, labels) if y == c)
        for name, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            assert abs(per[name] - frac * n) <= 1, (c, name, per)


def test_stratified_split_is_seeded_and_deterministic():
    labels = _labels([60, 40, 20])
    assert stratified_split(labels, seed=3) == stratified_split(labels, seed=3)
    assert stratified_split(labels, seed=3) != stratified_split(labels, seed=4)


def test_stratified_split_multilabel_vectors():
    labels = [[1, 0], [0, 1], [1, 1]] * 30
    splits = stratified_split(labels, seed=0)
    for combo in ([1, 0], [0, 1], [1, 1]):
        per = Counter(s for s, y in zip(splits, labels) if y == combo)
        assert per == {"train": 21, "val": 3, "test": 6}


def test_group_split_never_spans_two_splits_and_is_roughly_stratified():
    rng = np.random.default_rng(0)
    groups = [f"patient{int(g)}" for g in rng.integers(0, 120, size=1000)]
    labels = [int(g[7:]) % 3 for g in groups]  # a patient's label is fixed, as with most biopsies
    splits = stratified_split(labels, seed=0, groups=groups)
    where = {}
    for g, s in zip(groups, splits):
        assert where.setdefault(g, s) == s, f"group {g} spans two splits"
    share = Counter(splits)
    assert abs(share["train"] / 1000 - 0.7) < 0.05 and abs(share["test"] / 1000 - 0.2) < 0.05
    assert stratified_split(labels, seed=0, groups=groups) == splits


def test_bad_fractions_and_group_length_raise():
    with pytest.raises(ValueError, match="fractions"):
        stratified_split([0, 1], seed=0, fractions={"train": 0.5, "test": 0.2})
    with pytest.raises(ValueError, match="groups"):
        stratified_split([0, 1], seed=0, groups=["a"])


def test_cross_split_duplicates_counts_and_drops_later_copies():
    digests = ["a", "a", "b", "b", "c", "d", "d", "d"]
    splits = ["train", "test", "val", "test", "test", "train", "val", "train"]
    report = cross_split_duplicates(digests, splits)
    assert report.groups == 3  # a (train/test), b (val/test), d (train/val); c is alone
    assert report.samples == 7
    assert report.by_pair == {"train/test": 1, "val/test": 1, "train/val": 1}
    assert report.drop == [1, 3, 6]  # the copies outside the earliest split, never a train sample


def test_label_fraction_is_stratified_and_keeps_every_class():
    labels = _labels([900, 90, 9, 1])
    chosen = select_label_fraction(labels, 0.1, seed=0, task="multi-class")
    assert chosen == sorted(set(chosen))
    per = Counter(labels[i] for i in chosen)
    assert per == {0: 89, 1: 9, 2: 1, 3: 1}  # exactly 10% of 1,000; the rare classes' seats come from class 0
    tiny = select_label_fraction(labels, 0.01, seed=0, task="multi-class")
    assert Counter(labels[i] for i in tiny) == {0: 7, 1: 1, 2: 1, 3: 1}


def test_label_fraction_identical_across_simulated_ranks_and_seeded():
    labels = _labels([300, 200, 50])
    per_rank = [select_label_fraction(list(labels), 0.1, seed=7, task="multi-class") for _ in range(4)]
    assert all(r == per_rank[0] for r in per_rank)
    assert select_label_fraction(labels, 0.1, seed=8, task="multi-class") != per_rank[0]
    assert select_label_fraction(labels, 1.0, seed=7, task="multi-class") == list(range(len(labels)))


def test_label_fraction_multilabel_keeps_a_positive_of_every_label():
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 6)) < [0.5, 0.3, 0.1, 0.02, 0.01, 0.3]).astype(int).tolist()
    chosen = select_label_fraction(labels, 0.01, seed=0, task="multi-label")
    positives = np.asarray(labels)[chosen].sum(0)
    present = np.asarray(labels).sum(0) > 0
    assert (positives[present] >= 1).all()
    assert select_label_fraction(labels, 0.01, seed=0, task="multi-label") == chosen


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_label_fraction_out_of_range_names_the_field(fraction):
    with pytest.raises(ValueError, match="label_fraction"):
        select_label_fraction([0, 1], fraction, seed=0, task="multi-class")
