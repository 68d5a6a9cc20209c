"""Label fractions: exact totals by largest remainder, at least one per class, multi-label strata of one."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cass_dist.data.splits import select_label_fraction


def _balanced(classes: int, per_class: int) -> list[int]:
    return [c for c in range(classes) for _ in range(per_class)]


@pytest.mark.parametrize("fraction, total", [(0.15, 60), (0.1, 40), (0.33, 132), (0.5, 200), (0.99, 396),
                                             (0.025, 40), (0.01, 40)])
def test_the_total_is_exact_unless_one_per_class_needs_more(fraction, total):
    # 40 classes x 10 images: 0.15 used to give 0.20 (80 images) and 0.01 gave 0.10 (40).
    labels = _balanced(40, 10)
    chosen = select_label_fraction(labels, fraction, seed=0, task="multi-class")
    assert len(chosen) == total == max(round(fraction * 400), 40)
    per_class = Counter(labels[i] for i in chosen)
    assert len(per_class) == 40  # every class keeps at least one
    # Largest remainder: every class gets floor or ceil of its quota (0.01 and 0.025: the minimum of 1).
    quota = fraction * 10
    assert set(per_class.values()) <= {max(1, int(np.floor(quota))), max(1, int(np.ceil(quota)))}


def test_equal_remainders_are_shared_out_by_the_seed_not_by_class_order():
    labels = _balanced(40, 10)
    twos = [{c for c, n in Counter(labels[i] for i in select_label_fraction(labels, 0.15, seed=s,
                                                                             task="multi-class")).items() if n == 2}
            for s in range(3)]
    assert all(len(t) == 20 for t in twos)
    assert twos[0] != twos[1] and twos[0] != set(range(20))


def test_rare_classes_keep_one_and_the_seats_come_from_the_largest_class():
    labels = [0] * 900 + [1] * 90 + [2] * 9 + [3]
    for fraction, expected in ((0.1, {0: 89, 1: 9, 2: 1, 3: 1}), (0.01, {0: 7, 1: 1, 2: 1, 3: 1}),
                               (0.5, {0: 450, 1: 45, 2: 4, 3: 1})):
        chosen = select_label_fraction(labels, fraction, seed=0, task="multi-class")
        assert Counter(labels[i] for i in chosen) == expected
        assert len(chosen) == round(fraction * 1000)


def test_multi_label_strata_of_one_vector_count_and_every_label_keeps_a_positive():
    rng = np.random.default_rng(1)
    # 14 labels at 10% each: 129 samples have a label vector of their own, a stratum of one.
    labels = (rng.random((600, 14)) < 0.1).astype(int).tolist()
    assert sum(1 for n in Counter(tuple(r) for r in labels).values() if n == 1) == 129
    for fraction in (0.05, 0.1, 0.3):
        chosen = select_label_fraction(labels, fraction, seed=0, task="multi-label")
        # Exact: 30, 60, 180 (rounding stratum by stratum gave 21, 36 and 155).
        assert len(chosen) == round(fraction * 600)
        assert (np.asarray(labels)[chosen].sum(0) >= 1).all()
        assert chosen == sorted(set(chosen))
        assert select_label_fraction(labels, fraction, seed=0, task="multi-label") == chosen
    rare = (rng.random((300, 6)) < [0.5, 0.3, 0.1, 0.02, 0.01, 0.005]).astype(int).tolist()
    chosen = select_label_fraction(rare, 0.01, seed=0, task="multi-label")
    present = np.asarray(rare).sum(0) > 0
    assert (np.asarray(rare)[chosen].sum(0)[present] >= 1).all()
    assert 3 <= len(chosen) <= present.sum()  # the exact 3, or one positive per label where that needs more


def test_binary_fraction_is_exact_and_stratified():
    labels = [0] * 135 + [1] * 411  # BreastMNIST's train split
    chosen = select_label_fraction(labels, 0.1, seed=0, task="binary")
    # Quotas 13.5 and 41.1: the floors give 54, the larger remainder (0.5) gets the 55th.
    assert Counter(labels[i] for i in chosen) == {0: 14, 1: 41}
