"""One read_region conformance suite, run against every backend on the same generated image.

Each slide is lossless, so every backend must return exactly the factory's pyramid pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_mil.slides import PAD_VALUE, TileGrid, open_slide

CASES = ["openslide", "tiff-ome-subifd", "tiff-generic", "zarr-0.4", "zarr-0.5", "image-png"]


@pytest.fixture(params=CASES)
def case(request, slide_cases):
    return slide_cases[request.param]


@pytest.fixture
def slide(case):
    with open_slide(case.path, backend=case.backend) as s:
        yield s


def _expected(case, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
    """Reference window at level px, white where it lies outside the level."""
    ref = case.levels[level]
    out = np.full((h, w, 3), PAD_VALUE, np.uint8)
    lh, lw = ref.shape[:2]
    x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
    if x1 > x0 and y1 > y0:
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = ref[y0:y1, x0:x1]
    return out


def test_backend_and_levels(slide, case):
    assert slide.backend == case.backend
    assert slide.level_count == len(case.levels)
    assert slide.level_dimensions == [(lv.shape[1], lv.shape[0]) for lv in case.levels]
    assert slide.dimensions == slide.level_dimensions[0]
    assert slide.level_downsamples == pytest.approx([2.0**i for i in range(len(case.levels))])
    for i, ds in enumerate(slide.level_downsamples):
        assert slide.get_best_level_for_downsample(ds) == i
        assert slide.get_best_level_for_downsample(ds * 1.5) == i
    assert slide.get_best_level_for_downsample(0.5) == 0


def test_mpp_and_override(case):
    with open_slide(case.path, backend=case.backend) as s:
        assert s.native_mpp == (pytest.approx(case.mpp) if case.mpp else None)
        assert s.mpp == s.native_mpp
    with open_slide(case.path, backend=case.backend, mpp=0.25) as s:
        assert s.mpp == 0.25
        assert s.native_mpp == (pytest.approx(case.mpp) if case.mpp else None)


def test_tile_grid(slide, case):
    for level in range(slide.level_count):
        g = slide.tile_grid(level)
        if case.tile_px is None:
            assert g is None
        else:
            lw, lh = slide.level_dimensions[level]
            # zarr chunks are clipped to small arrays; TIFF tiles are not
            exp = TileGrid(case.tile_px, case.tile_px)
            assert g in (exp, TileGrid(min(case.tile_px, lw), min(case.tile_px, lh)))


def test_random_regions_exact(slide, case):
    rng = np.random.default_rng(3)
    for level in range(slide.level_count):
        ds = int(slide.level_downsamples[level])
        lw, lh = slide.level_dimensions[level]
        for _ in range(8):
            w, h = (int(v) for v in rng.integers(1, 300, 2))
            lx, ly = int(rng.integers(0, max(1, lw - w))), int(rng.integers(0, max(1, lh - h)))
            got = slide.read_region(level, lx * ds, ly * ds, w, h)
            assert got.dtype == np.uint8 and got.shape == (h, w, 3)
            np.testing.assert_array_equal(got, _expected(case, level, lx, ly, w, h))
            np.testing.assert_array_equal(slide.read_level_region(level, lx, ly, w, h), got)


def test_whole_levels_exact(slide, case):
    for level in range(slide.level_count):
        lw, lh = slide.level_dimensions[level]
        np.testing.assert_array_equal(slide.read_region(level, 0, 0, lw, lh), case.levels[level])


@pytest.mark.parametrize(
    "where",
    [
        "left-top",
        "right-bottom",
        "straddles-all",
        "outside-right",
        "outside-negative",
        "bottom-row",
    ],
)
def test_padding_past_edges(slide, case, where):
    for level in range(slide.level_count):
        ds = int(slide.level_downsamples[level])
        lw, lh = slide.level_dimensions[level]
        lx, ly, w, h = {
            "left-top": (-17, -9, 60, 50),
            "right-bottom": (lw - 20, lh - 11, 64, 48),
            "straddles-all": (-5, -6, lw + 13, lh + 7),
            "outside-right": (lw + 3, 10, 40, 30),
            "outside-negative": (-100, -80, 50, 40),
            "bottom-row": (0, lh - 1, lw, 5),
        }[where]
        got = slide.read_region(level, lx * ds, ly * ds, w, h)
        exp = _expected(case, level, lx, ly, w, h)
        np.testing.assert_array_equal(got, exp)
        if where.startswith("outside"):
            assert (got == PAD_VALUE).all()


def test_level0_coordinates_at_coarser_level(slide, case):
    """(x, y) are level-0 px whatever the level; w, h are px at that level (OpenSlide's rule)."""
    level = slide.level_count - 1
    ds = int(slide.level_downsamples[level])
    got = slide.read_region(level, 40 * ds, 24 * ds, 33, 21)
    np.testing.assert_array_equal(got, case.levels[level][24:45, 40:73])


def test_empty_and_bad_level(slide):
    assert slide.read_region(0, 0, 0, 0, 5).shape == (5, 0, 3)
    from wsi_mil.errors import SlideError

    with pytest.raises(SlideError, match="level 9 does not exist"):
        slide.read_region(9, 0, 0, 4, 4)


@pytest.mark.parametrize("max_px", [64, 200, 5000])
def test_thumbnail(slide, case, max_px):
    th = slide.thumbnail(max_px)
    h0, w0 = case.levels[0].shape[:2]
    assert th.dtype == np.uint8 and th.ndim == 3 and th.shape[2] == 3
    assert max(th.shape[:2]) == min(max_px, max(h0, w0))
    assert th.shape[1] / th.shape[0] == pytest.approx(w0 / h0, rel=0.03)
    size = (th.shape[1], th.shape[0])
    ref = np.asarray(Image.fromarray(case.levels[0]).resize(size, Image.Resampling.BILINEAR))
    # same picture through a different resampling path (pyramid level + box + bilinear)
    assert np.abs(th.astype(int) - ref.astype(int)).mean() < 8


def test_close_and_context_manager(case):
    s = open_slide(case.path, backend=case.backend)
    s.read_region(0, 0, 0, 8, 8)
    s.close()
    s.close()  # idempotent
