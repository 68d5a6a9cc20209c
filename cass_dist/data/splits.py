"""Split assignment, cross-split duplicate detection and label-fraction selection.

Everything here is a pure function of its inputs and a seed: the same labels and seed give the same
split (and the same label fraction) on every rank, every run and every machine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
SPLIT_ORDER = ("train", "val", "test")

Label = int | Sequence[int]


def stratum_of(label: Label) -> Hashable:
    """Return the stratification key of a label: the class id, or the 0/1 tuple of a multi-label vector."""
    return int(label) if isinstance(label, (int, np.integer)) else tuple(int(v) for v in label)


def _check_fractions(fractions: dict[str, float]) -> None:
    if not fractions or any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")


def _cut(n: int, fractions: Sequence[float]) -> list[int]:
    """Cut n items into len(fractions) parts by cumulative rounding (sizes add up to n exactly)."""
    bounds = np.round(np.cumsum([0.0, *fractions]) * n).astype(int)
    bounds[-1] = n
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def stratified_split(labels: Sequence[Label], *, seed: int, fractions: dict[str, float] | None = None,
                     groups: Sequence[Hashable] | None = None) -> list[str]:
    """Assign every sample to a split, stratified by label, seeded.

    Returns one split name per sample (the keys of ``fractions``, default 70/10/20 train/val/test).
    With ``groups`` (patient, slide ...), all samples of a group land in one split; groups are
    stratified by their most common label and dealt out so that sample counts approach the fractions.
    Raises ValueError for bad fractions or when ``groups`` and ``labels`` differ in length.
    """
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    _check_fractions(fractions)
    names = list(fractions)
    rng = np.random.default_rng(seed)
    if groups is None:
        by_stratum: dict[Hashable, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            by_stratum[stratum_of(label)].append(i)
        result = [""] * len(labels)
        for key in sorted(by_stratum, key=repr):
            members = rng.permutation(by_stratum[key])
            start = 0
            for name, size in zip(names, _cut(len(members), list(fractions.values()))):
                for i in members[start:start + size]:
                    result[int(i)] = name
                start += size
        return result
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries but labels has {len(labels)}")
    return _group_split(labels, groups, rng, fractions)


def _group_split(labels, groups, rng, fractions: dict[str, float]) -> list[str]:
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    by_stratum: dict[Hashable, list[Hashable]] = defaultdict(list)
    for group, idx in members.items():
        keys = [stratum_of(labels[i]) for i in idx]
        by_stratum[max(sorted(set(keys), key=repr), key=keys.count)].append(group)
    assigned: dict[Hashable, str] = {}
    for key in sorted(by_stratum, key=repr):
        stratum_groups = sorted(by_stratum[key], key=repr)
        order = rng.permutation(len(stratum_groups))
        total = sum(len(members[g]) for g in stratum_groups)
        filled = dict.fromkeys(fractions, 0)
        for j in order:
            group = stratum_groups[int(j)]
            # Give the group to the split furthest below its target share of this stratum.
            name = max(fractions, key=lambda s: (fractions[s] * total - filled[s], fractions[s]))
            assigned[group] = name
            filled[name] += len(members[group])
    return [assigned[g] for g in groups]


def assign_splits(given: Sequence[str | None], labels: Sequence[Label], groups: Sequence[Hashable] | None,
                  *, seed: int, val_fraction: float = 0.1) -> list[str]:
    """Return the split of every sample: the curator's (``given``) where set, else a stratified 70/10/20.

    A dataset with train and test but no val gets a stratified ``val_fraction`` of train as val.
    With ``groups``, the splits made here never put one group in two splits.
    Raises ValueError when only some samples have a curator split.
    """
    if all(g is None for g in given):
        return stratified_split(labels, seed=seed, groups=groups)
    if any(g is None for g in given):
        raise ValueError("some samples have a split and others do not; give every sample a split or none")
    splits = list(given)
    if "val" not in splits and "train" in splits:
        train = [i for i, s in enumerate(splits) if s == "train"]
        carved = stratified_split([labels[i] for i in train], seed=seed,
                                  fractions={"train": 1 - val_fraction, "val": val_fraction},
                                  groups=[groups[i] for i in train] if groups is not None else None)
        for i, s in zip(train, carved):
            splits[i] = s
    return splits


def shuffled_members(splits: Sequence[str], split: str, seed: int) -> list[int]:
    """Return the indices of ``split``'s samples in a seeded order (shards then mix classes, not sort them)."""
    idx = [i for i, s in enumerate(splits) if s == split]
    rng = np.random.default_rng([seed, SPLIT_ORDER.index(split)])
    return [idx[int(j)] for j in rng.permutation(len(idx))]


@dataclass
class DuplicateReport:
    """Byte-identical images found in more than one split."""

    groups: int = 0  # distinct contents present in two or more splits
    samples: int = 0  # samples holding such contents, all splits together
    by_pair: dict[str, int] = field(default_factory=dict)  # "train/test": groups shared by the two splits
    dropped: int = 0  # samples removed from val/test by dedupe
    drop: list[int] = field(default_factory=list)  # indices to remove when deduplicating

    def to_dict(self) -> dict:
        """Return the JSON form stored in ``Manifest.duplicates`` (without the index list)."""
        return {"cross_split_groups": self.groups, "cross_split_samples": self.samples,
                "by_pair": dict(self.by_pair), "dropped": self.dropped}


def cross_split_duplicates(digests: Sequence[str], splits: Sequence[str]) -> DuplicateReport:
    """Find contents (by digest) that occur in two or more splits.

    Returns a DuplicateReport; its ``drop`` lists the samples of val/test whose content also occurs in
    an earlier split (train before val before test), which is what ``--dedupe`` removes.
    """
    where: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(digests):
        where[digest].append(i)
    report = DuplicateReport()
    rank = {name: k for k, name in enumerate(SPLIT_ORDER)}
    for idx in where.values():
        if len(idx) < 2:
            continue
        present = sorted({splits[i] for i in idx}, key=lambda s: rank.get(s, len(rank)))
        if len(present) < 2:
            continue
        report.groups += 1
        report.samples += len(idx)
        for a in range(len(present)):
            for b in range(a + 1, len(present)):
                pair = f"{present[a]}/{present[b]}"
                report.by_pair[pair] = report.by_pair.get(pair, 0) + 1
        first = present[0]
        report.drop.extend(i for i in idx if splits[i] != first and splits[i] in ("val", "test"))
    report.drop.sort()
    report.dropped = len(report.drop)
    return report


def select_label_fraction(labels: Sequence[Label], fraction: float, *, seed: int, task: str) -> list[int]:
    """Return the sorted indices of a seeded, stratified ``fraction`` of ``labels``.

    ``labels`` holds class ids (multi-class, binary) or 0/1 lists (multi-label). The total is exact:
    ``round(fraction * len(labels))`` samples, unless the minimum below needs more. Strata (classes;
    for multi-label, distinct label vectors) get their shares by the largest-remainder method, ties
    broken by the seed, so 0.15 of 40 classes x 10 images is 60 images (20 classes with 2, 20 with 1)
    and a stratum of one vector can still be picked. The minimum: every class keeps at least one
    sample; for multi-label, every label with a positive sample keeps a positive. When that needs
    more than the exact total (0.01 of 40 classes x 10 images: 4 < 40 classes), the minimum wins and
    its extra seats come from the strata furthest above their share. The result depends only on the
    inputs, so every rank and every run selects the same subset.
    Raises ValueError naming ``label_fraction`` when fraction is not in (0, 1], or for an unknown task.
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction!r}")
    if task not in ("multi-class", "binary", "multi-label"):
        raise ValueError(f"task must be multi-class, binary or multi-label, got {task!r}")
    if fraction == 1 or not labels:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    by_stratum: dict[Hashable, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_stratum[stratum_of(label)].append(i)
    keys = sorted(by_stratum, key=repr)
    members = [[int(i) for i in rng.permutation(by_stratum[key])] for key in keys]
    required = _required_members(labels, members, seed, task)
    for m, req in zip(members, required):  # the required samples are taken first
        m.sort(key=lambda i, req=req: i not in req)
    quotas = [fraction * len(m) for m in members]
    total = max(int(math.floor(fraction * len(labels) + 0.5)), sum(len(r) for r in required), 1)
    counts = _largest_remainder(quotas, [len(r) for r in required], [len(m) for m in members], total,
                                tiebreak=rng.permutation(len(members)).tolist())
    return sorted(i for m, k in zip(members, counts) for i in m[:k])


def _required_members(labels: Sequence[Label], members: list[list[int]], seed: int, task: str) -> list[set[int]]:
    """Per stratum, the samples the minimum needs: each class's first, or a positive of every label."""
    if task != "multi-label":
        return [{m[0]} for m in members]
    rows = np.asarray(labels, dtype=bool)
    stratum = {i: s for s, m in enumerate(members) for i in m}
    required: list[set[int]] = [set() for _ in members]
    covered = np.zeros(rows.shape[1], dtype=bool)
    for label in sorted(range(rows.shape[1]), key=lambda j: (rows[:, j].sum(), j)):  # rarest label first
        if covered[label] or not rows[:, label].any():
            continue
        pick = min(np.flatnonzero(rows[:, label]).tolist(), key=lambda i: rng_order(seed, i))
        required[stratum[pick]].add(pick)
        covered |= rows[pick]
    return required


def _largest_remainder(quotas: list[float], minimum: list[int], maximum: list[int], total: int,
                       tiebreak: list[int]) -> list[int]:
    """Integer counts within [minimum, maximum] per stratum, summing to ``total``, closest to ``quotas``.

    Start from the floors (raised to the minimum), then give a seat to the strata with the largest
    remainders, or take one from those furthest above their quota (larger strata first on a tie,
    where one seat less matters least). ``tiebreak`` ranks strata on equal keys.
    """
    counts = [min(max(int(math.floor(q)), lo), hi) for q, lo, hi in zip(quotas, minimum, maximum)]
    while sum(counts) != total:
        short = sum(counts) < total
        if short:
            open_ = [s for s in range(len(counts)) if counts[s] < maximum[s]]
            order = sorted(open_, key=lambda s: (-(quotas[s] - counts[s]), tiebreak[s]))
        else:
            open_ = [s for s in range(len(counts)) if counts[s] > minimum[s]]
            order = sorted(open_, key=lambda s: (-(counts[s] - quotas[s]), -quotas[s], tiebreak[s]))
        if not order:  # cannot happen: total lies between sum(minimum) and the number of samples
            break
        for s in order[:abs(total - sum(counts))]:
            counts[s] += 1 if short else -1
    return counts


def rng_order(seed: int, index: int) -> int:
    """A seeded pseudo-random rank of ``index`` (stable across runs; used to break ties fairly)."""
    x = (index + 1) * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 27)) & 0xFFFFFFFFFFFFFFFF


def class_counts(labels: list, num_classes: int, task: str) -> list[int]:
    """Return samples per class (multi-label: positives per label)."""
    if task == "multi-label":
        return np.asarray(labels, dtype=np.int64).reshape(-1, num_classes).sum(0).astype(int).tolist()
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(int).tolist()


def class_weights(labels: list, num_classes: int, task: str) -> list[float]:
    """Return inverse-frequency class weights normalised to mean 1 (multi-label: per-label positives).

    A class absent from ``labels`` gets weight 0 (it never occurs, so it is never weighted).
    """
    counts = np.asarray(class_counts(labels, num_classes, task), dtype=np.float64)
    inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    if inverse.sum() == 0:
        return [1.0] * num_classes
    return [round(float(w), 6) for w in inverse * num_classes / inverse.sum()]
