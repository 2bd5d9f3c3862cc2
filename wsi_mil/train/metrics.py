"""Binary classification metrics, pure numpy. ``labels`` 0/1, ``probs`` in [0, 1].

Undefined values (AUC with one class present, sensitivity without positives ...) are
``None`` so that they serialise to JSON ``null`` rather than a misleading number.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _arrays(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(np.int64), s


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties get the mean of the ranks they span."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(labels: Any, scores: Any) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count 1/2); None with one class."""
    y, s = _arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    r = average_ranks(s)
    u = r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing; starts at (0, 0) with threshold +inf."""
    y, s = _arrays(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = (
        np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1] if len(s) else np.array([], int)
    )
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thr = np.r_[np.inf, s[last_of_run]]
    return fpr, tpr, thr


def confusion(labels: Any, probs: Any, threshold: float = 0.5) -> dict[str, int]:
    """Counts tp, fp, tn, fn with ``prob >= threshold`` predicted positive."""
    y, p = _arrays(labels, probs)
    pred = p >= threshold
    pos = y == 1
    return {
        "tp": int((pred & pos).sum()),
        "fp": int((pred & ~pos).sum()),
        "tn": int((~pred & ~pos).sum()),
        "fn": int((~pred & pos).sum()),
    }


def _ratio(a: int, b: int) -> float | None:
    return float(a / b) if b else None


def binary_metrics(labels: Any, probs: Any, threshold: float = 0.5) -> dict[str, Any]:
    """AUC, accuracy, balanced accuracy, F1, sensitivity, specificity, counts, threshold."""
    y, p = _arrays(labels, probs)
    c = confusion(y, p, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    prec = _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    bal = None if sens is None or spec is None else (sens + spec) / 2.0
    return {
        "n": int(len(y)),
        "n_pos": int(y.sum()),
        "n_neg": int(len(y) - y.sum()),
        "auc": roc_auc(y, p),
        "accuracy": _ratio(tp + tn, len(y)),
        "balanced_accuracy": bal,
        "f1": f1,
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "threshold": float(threshold),
        **c,
    }


def bce_from_logits(labels: Any, logits: Any) -> float | None:
    """Mean binary cross-entropy of logits (numerically stable); None for no samples."""
    y = np.asarray(labels, np.float64).reshape(-1)
    z = np.asarray(logits, np.float64).reshape(-1)
    if len(y) == 0:
        return None
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
