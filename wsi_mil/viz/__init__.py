"""Attention heatmaps and localisation metrics (``wsi-mil heatmap``).

- :func:`make_heatmaps` (cfg: HeatmapConfig) -> HeatmapResult (a BatchResult): PNGs under
  ``R/heatmaps/`` and ``R/localisation.json``.
- :func:`localisation_report` (run_dir, markers_csv) -> dict: top-1 / top-k marker hits and
  patch-level AUC of attention vs "patch overlaps a marker", per slide and aggregated.
- Drawing primitives (pure numpy) in :mod:`wsi_mil.viz.heatmap`, maths in
  :mod:`wsi_mil.viz.localisation`.
"""

from __future__ import annotations

from wsi_mil.viz.attention import AttentionMap, read_attention
from wsi_mil.viz.heatmap import draw_attention_boxes, draw_marker_boxes, draw_smooth_heatmap
from wsi_mil.viz.localisation import (
    localisation_report,
    patch_auc,
    patch_marker_overlap,
    read_markers,
    slide_localisation,
    top_k_hit,
)
from wsi_mil.viz.make import HeatmapResult, make_heatmaps, render_slide

__all__ = [
    "AttentionMap",
    "HeatmapResult",
    "draw_attention_boxes",
    "draw_marker_boxes",
    "draw_smooth_heatmap",
    "localisation_report",
    "make_heatmaps",
    "patch_auc",
    "patch_marker_overlap",
    "read_attention",
    "read_markers",
    "render_slide",
    "slide_localisation",
    "top_k_hit",
]
