"""resize_patches: the resampling of patches read between pyramid levels (--mpp)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_mil.tiling.read import resize_patches, resize_rgb


def _pillow(img: np.ndarray, size_px: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size_px, size_px), Image.Resampling.BILINEAR))


def _tissue_like(n: int, side: int, seed: int = 0) -> np.ndarray:
    """(n, side, side, 3) uint8: smooth fields + noise + sharp edges (what resizing meets)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = 128 + 80 * np.sin(6 * xx + 3 * yy)[None, ..., None]
    noise = rng.normal(0, 25, (n, side, side, 3))
    edges = np.where((xx > 0.4) & (yy < 0.7), 60, 0)[None, ..., None]
    return np.clip(base + noise + edges, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("side", "size_px"),
    [(448, 224), (443, 224), (672, 224), (180, 224), (97, 64), (224, 224)],
    ids=["2x", "1.98x (0.2525 -> 0.5 mpp)", "3x", "upsample 0.8x", "odd", "same size"],
)
def test_within_one_grey_level_of_pillow_bilinear(side: int, size_px: int) -> None:
    patches = _tissue_like(3, side)
    got = resize_patches(patches, size_px)
    assert got.shape == (3, size_px, size_px, 3) and got.dtype == np.uint8
    for k in range(3):
        diff = np.abs(got[k].astype(np.int16) - _pillow(patches[k], size_px))
        assert diff.max() <= 1
        assert (diff > 0).mean() < 0.05  # rounding differences only


def test_batch_equals_one_at_a_time_and_writes_into_out() -> None:
    patches = _tissue_like(5, 301, seed=1)
    out = np.zeros((5, 128, 128, 3), np.uint8)
    assert resize_patches(patches, 128, out=out) is out
    for k in range(5):
        np.testing.assert_array_equal(out[k], resize_rgb(patches[k], 128))


def test_takes_read_only_and_strided_input() -> None:
    patches = _tissue_like(4, 120, seed=2)
    ref = resize_patches(patches, 60)
    ro = patches.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(resize_patches(ro, 60), ref)
    wide = np.concatenate([patches, patches], axis=2)[:, :, :120]  # not C-contiguous
    np.testing.assert_array_equal(resize_patches(wide, 60), ref)


def test_empty_batch_and_bad_input() -> None:
    assert resize_patches(np.zeros((0, 10, 10, 3), np.uint8), 4).shape == (0, 4, 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        resize_patches(np.zeros((1, 10, 10, 3), np.float32), 4)
    with pytest.raises(ValueError, match="uint8"):
        resize_patches(np.zeros((10, 10, 3), np.uint8), 4)
