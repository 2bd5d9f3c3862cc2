"""Reading patches straight from a slide (coords-only stores, equality checks)."""

from __future__ import annotations

import numpy as np

from wsi_mil.slides.base import Slide


def read_patches_from_slide(
    slide: Slide, level0_xy: np.ndarray, level: int, patch_px: int, patch_px_level: int
) -> np.ndarray:
    """(n, patch_px, patch_px, 3) uint8: each patch read at ``level`` (``patch_px_level`` px) and resized.

    Slow path (one ``read_region`` per patch); tiling uses tile-aligned windows instead.
    """
    out = np.empty((len(level0_xy), patch_px, patch_px, 3), np.uint8)
    for i, (x, y) in enumerate(np.asarray(level0_xy)):
        reg = slide.read_region(level, int(x), int(y), patch_px_level, patch_px_level)
        out[i] = reg if patch_px_level == patch_px else resize_rgb(reg, patch_px)
    return out


def resize_rgb(img: np.ndarray, size_px: int) -> np.ndarray:
    """Area/bilinear resize of an (h, w, 3) uint8 image to (size_px, size_px, 3)."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size_px, size_px), Image.Resampling.BILINEAR))
