"""Pure-numpy metrics against brute force and hand-worked cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from wsi_mil.train.metrics import (
    average_ranks,
    bce_from_logits,
    binary_metrics,
    roc_auc,
    roc_curve,
)


def _pairwise_auc(y, s):
    pos = [b for a, b in zip(y, s, strict=True) if a == 1]
    neg = [b for a, b in zip(y, s, strict=True) if a == 0]
    tot = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return tot / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s))


def test_auc_edge_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    with pytest.raises(ValueError):
        roc_auc([0, 2], [0.1, 0.2])


def test_average_ranks():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_roc_curve_area_equals_auc():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 100)
    s = np.round(rng.random(100) + 0.3 * y, 2)
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(thr[1:]) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))


def test_binary_metrics_hand_example():
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.3, 0.5]
    m = binary_metrics(y, p, threshold=0.5)
    # predicted positive: 0.9, 0.6, 0.7, 0.5 -> tp 2, fp 2, fn 1, tn 3
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 1, 3)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["threshold"] == 0.5
    assert m["auc"] == pytest.approx(_pairwise_auc(y, p))


def test_one_class_metrics_are_none_not_numbers():
    m = binary_metrics([0, 0], [0.1, 0.7])
    assert m["auc"] is None and m["sensitivity"] is None and m["balanced_accuracy"] is None
    assert m["specificity"] == 0.5


def test_bce_from_logits_matches_torch():
    import torch

    z = np.array([-30.0, -1.0, 0.0, 2.0, 40.0])
    y = np.array([0, 1, 1, 0, 1])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(z), torch.tensor(y, dtype=torch.float64)
    )
    assert bce_from_logits(y, z) == pytest.approx(float(ref))
