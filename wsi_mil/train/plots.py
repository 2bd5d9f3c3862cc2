"""Plots a user looks at: ROC curves (``R/plots/roc.png``) and training curves
(``R/plots/training.png``). matplotlib with the Agg backend; files written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.batch import atomic_path
from wsi_mil.train.metrics import roc_auc, roc_curve


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_roc(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str | Path
) -> Path | None:
    """One ROC curve per name (``{"val": (labels, probs), ...}``); names with one class are skipped."""
    usable = {k: v for k, v in curves.items() if roc_auc(*v) is not None}
    if not usable:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    for name, (y, p) in usable.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.step(fpr, tpr, where="post", lw=2, label=f"{name}: AUC {roc_auc(y, p):.3f} (n={len(y)})")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Loss (train, val) and validation AUC per epoch, from the rows of metrics.csv."""
    if not history:
        return None
    plt = _pyplot()

    def col(k: str) -> np.ndarray:
        return np.array([np.nan if r.get(k) is None else float(r[k]) for r in history])

    ep = col("epoch")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.plot(ep, col("train_loss"), "o-", label="train")
    if np.isfinite(col("val_loss")).any():
        a1.plot(ep, col("val_loss"), "o-", label="validation")
    best = [int(r["epoch"]) for r in history if r.get("best")]
    if best:
        a1.axvline(best[-1], color="0.6", ls=":", label=f"best epoch {best[-1]}")
    a1.set(xlabel="epoch", ylabel="BCE loss", title="loss")
    a1.legend(fontsize=8)
    auc = col("val_auc")
    if np.isfinite(auc).any():
        a2.plot(ep, auc, "o-", color="C2")
    a2.set(xlabel="epoch", ylabel="AUC", ylim=(0, 1.02), title="validation AUC")
    return _save(fig, path)
