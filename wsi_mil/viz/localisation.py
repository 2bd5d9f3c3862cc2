"""Does attention point at the markers? Pure maths on level-0 boxes, plus a run-folder report.

A patch is the level-0 box ``[x, x + patch_size_level0) x [y, y + patch_size_level0)``;
a marker is its bounding box ``[x0, x1) x [y0, y1)`` from ``markers.csv`` (x1/y1
exclusive). A patch "hits" a marker when the two boxes share at least one pixel.

Positive slides are those labelled 1 in the attention file or, when the label is unknown
(-1), those with at least one marker. Per positive slide: does the top-attended patch hit
a marker (``top1_hit``), does any of the top-k (``topk_hit``), and the patch-level AUC
of attention against "patch hits a marker" (``patch_auc``; None when every patch or no
patch hits one).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import ConfigError, WsiMilError

log = logging.getLogger(__name__)

MARKER_REQUIRED = ("slide_id", "x0", "y0", "x1", "y1")


# ---------------------------------------------------------------- pure maths
def patch_marker_overlap(
    coords_level0: np.ndarray, patch_size_level0: int, marker_boxes: np.ndarray
) -> np.ndarray:
    """(N,) bool: patch i (top-left ``coords_level0[i]``, side ``patch_size_level0``) hits a marker.

    ``marker_boxes`` (M, 4) level-0 ``x0, y0, x1, y1`` with x1/y1 exclusive. M = 0 gives all False.
    """
    xy = np.asarray(coords_level0, dtype=np.int64).reshape(-1, 2)
    boxes = np.asarray(marker_boxes, dtype=np.int64).reshape(-1, 4)
    hit = np.zeros(len(xy), dtype=bool)
    ps = int(patch_size_level0)
    px0, py0 = xy[:, 0], xy[:, 1]
    px1, py1 = px0 + ps, py0 + ps
    for x0, y0, x1, y1 in boxes:  # markers per slide are few; patches are vectorised
        hit |= (px0 < x1) & (x0 < px1) & (py0 < y1) & (y0 < py1)
    return hit


def top_k_indices(attention: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest attention values, largest first (ties: lower index first)."""
    a = np.asarray(attention, dtype=np.float64).reshape(-1)
    k = max(0, min(int(k), len(a)))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-a, kind="stable")
    return order[:k].astype(np.int64)


def top_k_hit(attention: np.ndarray, overlap: np.ndarray, k: int = 1) -> bool:
    """True if any of the ``k`` most-attended patches overlaps a marker."""
    idx = top_k_indices(attention, k)
    return bool(np.asarray(overlap, dtype=bool)[idx].any()) if len(idx) else False


def patch_auc(attention: np.ndarray, overlap: np.ndarray) -> float | None:
    """Rank AUC of attention scores against "patch overlaps a marker"; None with one class."""
    from wsi_mil.train.metrics import roc_auc

    return roc_auc(np.asarray(overlap, dtype=np.int64), np.asarray(attention, dtype=np.float64))


def slide_localisation(
    attention: np.ndarray,
    coords_level0: np.ndarray,
    patch_size_level0: int,
    marker_boxes: np.ndarray,
    k: int = 8,
) -> dict[str, Any]:
    """Localisation numbers of one slide (JSON-able): top-1/top-k hit, patch AUC, counts."""
    att = np.asarray(attention, dtype=np.float64).reshape(-1)
    hit = patch_marker_overlap(coords_level0, patch_size_level0, marker_boxes)
    top = top_k_indices(att, 1)
    xy = np.asarray(coords_level0).reshape(-1, 2)
    return {
        "n_patches": int(len(att)),
        "n_markers": int(len(np.asarray(marker_boxes).reshape(-1, 4))),
        "n_marker_patches": int(hit.sum()),
        "top1_hit": top_k_hit(att, hit, 1),
        "topk_hit": top_k_hit(att, hit, k),
        "patch_auc": patch_auc(att, hit),
        "top_patch_level0_xy": [int(v) for v in xy[top[0]]] if len(top) else None,
    }


def summarise(slides: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    """Aggregate per-slide rows (``positive`` flag + :func:`slide_localisation` keys)."""
    pos = [s for s in slides if s.get("positive") and s.get("n_markers", 0) > 0]
    aucs = [s["patch_auc"] for s in pos if s.get("patch_auc") is not None]

    def share(key: str) -> float | None:
        return float(np.mean([bool(s[key]) for s in pos])) if pos else None

    return {
        "k": int(k),
        "n_slides": len(slides),
        "n_positive": sum(bool(s.get("positive")) for s in slides),
        "n_positive_with_markers": len(pos),
        "top1_hit_rate": share("top1_hit"),
        "topk_hit_rate": share("topk_hit"),
        "mean_patch_auc": float(np.mean(aucs)) if aucs else None,
        "median_patch_auc": float(np.median(aucs)) if aucs else None,
        "n_patch_auc": len(aucs),
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Human-readable summary of :func:`localisation_report`'s dict."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    n = report["n_positive_with_markers"]
    hits = f"  top-attended patch on a marker: {pct(report['top1_hit_rate'])}"
    if int(report["k"]) > 1:  # top-1 is the line itself (heatmap --top-k 0 reports k = 1)
        hits += f"; any of top-{report['k']}: {pct(report['topk_hit_rate'])}"
    return [
        f"localisation over {n} positive slide(s) with markers "
        f"({report['n_slides']} slides, markers from {report.get('markers_csv')}):",
        hits,
        f"  patch-level AUC (attention vs patch overlaps a marker): mean "
        f"{num(report['mean_patch_auc'])}, median {num(report['median_patch_auc'])} "
        f"over {report['n_patch_auc']} slide(s)",
    ]


# ---------------------------------------------------------------- I/O
def read_markers(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``markers.csv`` -> {slide_id: (M, 4) int64 level-0 x0, y0, x1, y1}.

    Only ``slide_id,x0,y0,x1,y1`` are needed; other columns (shape, colour, ...) are ignored.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"markers file {p} does not exist", "check the --markers path")
    out: dict[str, list[list[int]]] = {}
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MARKER_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(
                f"{p}: not a markers table (missing column(s) {', '.join(missing)})",
                "expected columns slide_id,x0,y0,x1,y1 (level-0 px, x1/y1 exclusive)",
            )
        for i, row in enumerate(reader, start=2):
            try:
                box = [int(round(float(row[c]))) for c in ("x0", "y0", "x1", "y1")]
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{p}, line {i}: marker coordinates must be numbers", "fix or remove the row"
                ) from None
            out.setdefault(str(row["slide_id"]), []).append(box)
    return {k: np.asarray(v, dtype=np.int64).reshape(-1, 4) for k, v in out.items()}


def find_markers_csv(
    markers: str | os.PathLike | None,
    slides_csv: str | os.PathLike | None = None,
    slide_path: str | os.PathLike | None = None,
) -> Path | None:
    """The markers table to use: ``markers`` if given, else ``markers.csv`` next to the slide
    table, else next to the slide file; None when there is none."""
    if markers:
        p = Path(markers)
        if not p.is_file():
            raise ConfigError(f"markers file {p} does not exist", "check the --markers path")
        return p
    for base in (slides_csv, slide_path):
        if base:
            cand = Path(base).parent / "markers.csv"
            if cand.is_file():
                return cand
    return None


def _positive(label: int, n_markers: int) -> bool:
    return label == 1 or (label < 0 and n_markers > 0)


def localisation_report(
    run_dir: str | os.PathLike,
    markers_csv: str | os.PathLike | None,
    k: int = 8,
    slides_csv: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Localisation of every ``R/attention/<id>.h5`` against ``markers_csv``; returns a dict.

    ``markers_csv`` None: found per slide with :func:`find_markers_csv`. Slides with no
    markers table at all, or without coordinates, are listed under ``excluded``.
    Does not write anything (``make_heatmaps`` writes it to ``R/localisation.json``).
    """
    from wsi_mil.viz.attention import attention_files, read_attention, resolve_slide_paths

    run = Path(run_dir)
    files = attention_files(run)
    paths = resolve_slide_paths(run, files, slides_csv)
    cache: dict[Path, dict[str, np.ndarray] | WsiMilError] = {}
    rows: list[dict[str, Any]] = []
    excluded: dict[str, str] = {}
    used: set[str] = set()
    for sid, f in files.items():
        mpath = find_markers_csv(markers_csv, slides_csv, paths.get(sid))
        if mpath is None:
            excluded[sid] = "no markers.csv found"
            continue
        if mpath not in cache:
            try:
                cache[mpath] = read_markers(mpath)
            except WsiMilError as e:  # a markers.csv found next to the slides: its slides
                cache[mpath] = e  # already failed in the batch; the report leaves them out
        table = cache[mpath]
        if isinstance(table, WsiMilError):
            excluded[sid] = str(table)
            continue
        used.add(str(mpath))
        try:
            am = read_attention(f)
        except WsiMilError as e:  # a broken file is the batch's failure, not the report's
            excluded[sid] = str(e)
            continue
        if not am.has_coords:
            excluded[sid] = "attention file has no coordinates"
            continue
        boxes = table.get(sid, np.zeros((0, 4), np.int64))
        row = {
            "slide_id": sid,
            "label": am.label,
            "prob": am.prob,
            "split": am.split,
            "positive": _positive(am.label, len(boxes)),
            **slide_localisation(am.attention, am.coords, am.patch_size_level0, boxes, k),
        }
        rows.append(row)
    report = {
        "run": str(run),
        "markers_csv": ", ".join(sorted(used)) if used else None,
        **summarise(rows, k),
        "by_split": _by_split(rows, k),
        "slides": rows,
        "excluded": excluded,
    }
    return _json_safe(report)


def _by_split(rows: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    splits = sorted({r.get("split") or "" for r in rows})
    if len(splits) <= 1:
        return {}
    out = {}
    for sp in splits:
        sub = [r for r in rows if (r.get("split") or "") == sp]
        out[sp or "none"] = summarise(sub, k)
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report as JSON, atomically."""
    from wsi_mil.batch import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")


__all__ = [
    "find_markers_csv",
    "localisation_report",
    "patch_auc",
    "patch_marker_overlap",
    "read_markers",
    "slide_localisation",
    "summarise",
    "summary_lines",
    "top_k_hit",
    "top_k_indices",
    "write_report",
]
