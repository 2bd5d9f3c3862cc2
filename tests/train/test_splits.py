"""Slide-level splits: split column, stratified val share, true stratified k-fold; epoch order."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_mil.errors import ConfigError
from wsi_mil.train.splits import (
    assign_splits,
    epoch_permutation,
    step_groups,
    stratified_folds,
    stratified_holdout,
)

IDS = [f"s{i:02d}" for i in range(23)]
LABELS = [int(i % 3 == 0) for i in range(23)]  # 8 positives, 15 negatives


def test_kfold_is_a_partition_and_stratified():
    k = 4
    seen: dict[str, int] = {}
    for fold in range(k):
        sp = assign_splits(IDS, LABELS, [None] * 23, folds=k, fold=fold, seed=3)
        val = [s for s, v in sp.items() if v == "val"]
        for s in val:
            assert s not in seen, "a slide validates in two folds"
            seen[s] = fold
        pos = sum(LABELS[IDS.index(s)] for s in val)
        assert pos in (2, 3)  # 8 positives over 4 folds
        assert set(sp.values()) == {"train", "val"}
    assert sorted(seen) == IDS


def test_kfold_keeps_test_slides_out():
    given = ["test" if i < 5 else None for i in range(23)]
    sp = assign_splits(IDS, LABELS, given, folds=3, fold=1)
    assert all(sp[IDS[i]] == "test" for i in range(5))
    assert {sp[s] for s in IDS[5:]} == {"train", "val"}


def test_fold_sizes_balanced():
    f = stratified_folds(LABELS, 5, seed=0)
    counts = np.bincount(f, minlength=5)
    assert counts.max() - counts.min() <= 1


def test_split_column_wins_over_val_frac():
    given = ["val" if i < 4 else "train" for i in range(23)]
    sp = assign_splits(IDS, LABELS, given, val_frac=0.5)
    assert [s for s in IDS if sp[s] == "val"] == IDS[:4]


def test_val_frac_is_stratified_and_deterministic():
    a = assign_splits(IDS, LABELS, [None] * 23, val_frac=0.25, seed=7)
    b = assign_splits(IDS, LABELS, [None] * 23, val_frac=0.25, seed=7)
    c = assign_splits(IDS, LABELS, [None] * 23, val_frac=0.25, seed=8)
    assert a == b and a != c
    val = [s for s in IDS if a[s] == "val"]
    assert sum(LABELS[IDS.index(s)] for s in val) == 2  # round(0.25 * 8)
    assert len(val) == 2 + 4  # + round(0.25 * 15)


def test_val_frac_zero_and_tiny_classes():
    assert set(assign_splits(IDS, LABELS, [None] * 23, val_frac=0.0).values()) == {"train"}
    held = stratified_holdout([0, 1, 1], 0.5)
    assert held.count(True) == 1 and not held[0]  # a single negative stays in training


def test_bad_options():
    with pytest.raises(ConfigError):
        assign_splits(IDS, LABELS, [None] * 23, folds=3, fold=3)
    with pytest.raises(ConfigError):
        stratified_holdout(LABELS, 1.0)
    with pytest.raises(ConfigError):
        stratified_folds([0, 1], 3)


def test_epoch_permutation_and_groups():
    p0, p0b, p1 = (
        epoch_permutation(10, 0, 0),
        epoch_permutation(10, 0, 0),
        epoch_permutation(10, 0, 1),
    )
    assert p0 == p0b and p0 != p1 and sorted(p0) == list(range(10))
    assert step_groups(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_fold_without_folds_is_refused():
    """--fold 2 without --folds was silently ignored (a plain hold-out split was used)."""
    ids, labels = [f"s{i}" for i in range(10)], [i % 2 for i in range(10)]
    with pytest.raises(ConfigError, match="--fold 2 needs --folds K"):
        assign_splits(ids, labels, [None] * 10, fold=2)
    assert assign_splits(ids, labels, [None] * 10, fold=0)  # the default stays valid
