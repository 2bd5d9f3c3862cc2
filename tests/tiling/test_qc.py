"""The QC image: outlines and fills against Pillow's rectangles, tint, shading, size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from wsi_mil.tiling.qc import PATCH_RGB, QC_MAX_PX, qc_image, rect_fill, rect_outlines

H, W = 60, 80


def _random_rects(n: int, min_side: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(-15, W + 5, n), rng.uniform(-15, H + 5, n)
    return [x0, y0, x0 + rng.uniform(min_side, 25, n), y0 + rng.uniform(min_side, 25, n)]


def _pillow(rects: list[np.ndarray], fill: bool) -> np.ndarray:
    im = Image.new("L", (W, H))
    draw = ImageDraw.Draw(im)
    for x0, y0, x1, y1 in zip(*rects, strict=True):
        if fill:
            draw.rectangle([x0, y0, x1, y1], fill=255)
        else:
            draw.rectangle([x0, y0, x1, y1], outline=255)
    return np.asarray(im) > 0


@pytest.mark.parametrize("n", [1, 7, 300])
def test_outlines_match_pillow(n):
    # fractional and partly outside rectangles, at least 3 px a side (as the QC image draws)
    rects = _random_rects(n, 3.0, seed=n)
    got = rect_outlines((H, W), *rects)
    np.testing.assert_array_equal(got, _pillow(rects, fill=False))
    assert got.any() or n == 1  # the single rectangle of seed 1 lies outside the image


@pytest.mark.parametrize("n", [1, 7, 300])
def test_fill_matches_pillow(n):
    rects = _random_rects(n, 0.0, seed=n)
    got = rect_fill((H, W), *rects)
    np.testing.assert_array_equal(got, _pillow(rects, fill=True))


def test_no_rectangles_draw_nothing():
    empty = [np.zeros(0)] * 4
    assert not rect_outlines((H, W), *empty).any()
    assert not rect_fill((H, W), *empty).any()


def _thumb(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_tint_only_where_tissue_and_outlines_in_blue():
    thumb = _thumb(100, 120)
    mask = np.zeros((100, 120), bool)
    mask[:, 60:] = True
    # one patch of 20 thumbnail px at (10, 10) level-0 px x 10 per thumbnail px
    img = qc_image(thumb, mask, np.array([[100, 100]]), 200, (10.0, 10.0))
    assert img.shape == thumb.shape
    np.testing.assert_array_equal(img[50:, :60], thumb[50:, :60])  # no tissue, no patch
    tinted = thumb[50:, 60:].astype(np.uint16) * 7 // 10
    tinted[..., 1] += 60
    np.testing.assert_array_equal(img[50:, 60:], tinted)
    assert (img[10, 10:30] == PATCH_RGB).all() and (img[29, 10:30] == PATCH_RGB).all()
    assert (img[10:30, 10] == PATCH_RGB).all() and (img[10:30, 29] == PATCH_RGB).all()
    np.testing.assert_array_equal(img[11:29, 11:29], thumb[11:29, 11:29])  # inside untouched


def test_tiny_patches_are_shaded_not_outlined():
    thumb = np.full((50, 50, 3), 255, np.uint8)
    img = qc_image(thumb, np.zeros((50, 50), bool), np.array([[0, 0], [200, 0]]), 20, (10.0, 10.0))
    shaded = img[0, 0].astype(int)
    assert (shaded < 255).any() and not (shaded == PATCH_RGB).all()  # blended, not painted
    np.testing.assert_array_equal(img[0, 20], shaded)
    np.testing.assert_array_equal(img[10, 10], [255, 255, 255])


def test_large_thumbnail_reduced_to_qc_size():
    thumb = _thumb(2 * QC_MAX_PX + 10, 300)
    img = qc_image(thumb, np.ones(thumb.shape[:2], bool), np.zeros((0, 2)), 100, (1.0, 1.0))
    assert max(img.shape[:2]) <= QC_MAX_PX
    assert img.shape[:2] == (-(-thumb.shape[0] // 3), -(-thumb.shape[1] // 3))
