"""Acceptance: our tifffile backend and OpenSlide agree on the same JPEG-tiled pyramidal TIFF.

For 20 random regions at every level (level-0 coordinates anywhere, including past the
edges) the pixels are identical (tolerance 0: both decode the same JPEG tiles with
libjpeg-turbo and, for integer downsamples, OpenSlide maps level-0 x to round-half-even(x / ds)
exactly as we do), and mpp agrees.
"""

from __future__ import annotations

import numpy as np
import pytest
from slide_factory import make_pyramidal_tiff, test_image

from wsi_mil.slides import open_slide

TOLERANCE = 0  # per channel; the issue allows +-2


@pytest.fixture(scope="module")
def jpeg_tiff(tmp_path_factory):
    d = tmp_path_factory.mktemp("jpeg")
    img = test_image(1024, 1536, seed=11)
    return make_pyramidal_tiff(
        d / "slide.tif", img, n_levels=4, tile_px=256, mpp=0.2526, compression="jpeg"
    )


def test_tiff_backend_matches_openslide(jpeg_tiff):
    ours = open_slide(jpeg_tiff)
    ref = open_slide(jpeg_tiff, backend="openslide")
    assert ours.backend == "tiff" and ref.backend == "openslide"
    assert ref.vendor == "generic-tiff"
    assert ours.level_dimensions == ref.level_dimensions
    assert ours.level_downsamples == pytest.approx(ref.level_downsamples)
    assert ours.mpp == pytest.approx(ref.mpp, rel=1e-9) and ref.mpp == pytest.approx(0.2526)
    assert [ours.tile_grid(i) for i in range(4)] == [ref.tile_grid(i) for i in range(4)]
    rng = np.random.default_rng(0)
    w0, h0 = ours.dimensions
    for level in range(ours.level_count):
        for _ in range(20):
            w, h = (int(v) for v in rng.integers(1, 400, 2))
            x, y = int(rng.integers(-300, w0 + 50)), int(rng.integers(-300, h0 + 50))
            a = ours.read_region(level, x, y, w, h)
            b = ref.read_region(level, x, y, w, h)
            diff = np.abs(a.astype(int) - b.astype(int)).max()
            assert diff <= TOLERANCE, f"level {level} region ({x}, {y}, {w}x{h}): max diff {diff}"
    np.testing.assert_array_equal(ours.thumbnail(300), ref.thumbnail(300))


def test_subifd_pyramid_openslide_cannot_but_we_can(tmp_path):
    """An OME-TIFF keeps its pyramid in SubIFDs: OpenSlide sees one level, we see all."""
    img = test_image(512, 768, seed=2)
    p = make_pyramidal_tiff(
        tmp_path / "s.ome.tif", img, n_levels=3, tile_px=128, compression="jpeg", ome=True
    )
    ours = open_slide(p)
    assert ours.backend == "tiff" and ours.level_count == 3
    ref = open_slide(p, backend="openslide")
    assert ref.level_count == 1
    np.testing.assert_array_equal(
        ours.read_region(0, 5, 7, 300, 200), ref.read_region(0, 5, 7, 300, 200)
    )
