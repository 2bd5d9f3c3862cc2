"""Images for tiling tests: glass with tissue blobs, blank glass."""

from __future__ import annotations

import numpy as np

# level-0 size not a multiple of the patch sizes used, so edge patches run past the image
H, W = 520, 712
MPP = 0.5
BACKEND_CASES = ["openslide", "tiff-ome", "zarr-0.4", "zarr-0.5", "image-png"]


def tissue_slide_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """White glass with two pink-purple 'tissue' blobs (left third and bottom right)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, np.uint8)
    img += rng.integers(0, 8, img.shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((xx - w * 0.2) / (w * 0.15)) ** 2 + ((yy - h * 0.5) / (h * 0.35)) ** 2 <= 1
    blob |= ((xx - w * 0.75) / (w * 0.12)) ** 2 + ((yy - h * 0.78) / (h * 0.12)) ** 2 <= 1
    tissue = np.stack(
        [
            rng.integers(150, 220, (h, w)),
            rng.integers(60, 120, (h, w)),
            rng.integers(140, 200, (h, w)),
        ],
        -1,
    ).astype(np.uint8)
    img[blob] = tissue[blob]
    return img


def blank_image(h: int, w: int, seed: int = 1) -> np.ndarray:
    """Empty glass: near-white noise, no tissue."""
    rng = np.random.default_rng(seed)
    return (240 + rng.integers(0, 10, (h, w, 3))).astype(np.uint8)
