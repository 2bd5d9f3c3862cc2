"""render_region: pure, tiling-independent, and every level ~ the area-downsampled level 0."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_mil.synth.render import Marker, SlideSpec, marker_coverage, render_region, tissue_mask

MARKERS = (
    Marker("circle", 300.0, 310.0, 40.0, 40.0, 0.0, "red", 4),
    Marker("ellipse", 700.0, 500.0, 50.0, 22.0, 33.0, "blue", 3),
    Marker("rectangle", 420.0, 760.0, 45.0, 25.0, 17.0, "green", 2),
    Marker("circle", 800.0, 200.0, 30.0, 30.0, 0.0, "yellow", 6, filled=True),
)


def _spec(background: str) -> SlideSpec:
    return SlideSpec(
        "t", 1024, 1024, 1, background, 1234, MARKERS, brightness=4.0, tissue_scale_px=256.0
    )


@pytest.mark.parametrize("background", ["tissue", "noise"])
def test_render_is_deterministic_and_independent_of_tiling(background: str) -> None:
    spec = _spec(background)
    whole = render_region(spec, 0, 0, 512, 512)
    assert np.array_equal(whole, render_region(spec, 0, 0, 512, 512))
    pieces = np.concatenate(
        [
            np.concatenate(
                [render_region(spec, x, y, 128, 128) for x in range(0, 512, 128)], axis=1
            )
            for y in range(0, 512, 128)
        ]
    )
    diff = np.abs(whole.astype(int) - pieces.astype(int))
    assert diff.max() <= 1  # float summation order only
    assert (diff == 0).mean() > 0.999


@pytest.mark.parametrize("background", ["tissue", "noise"])
@pytest.mark.parametrize("d", [2, 4, 8, 16])
def test_levels_match_area_downsampled_level0(background: str, d: int) -> None:
    spec = _spec(background)
    lvl0 = render_region(spec, 0, 0, 1024, 1024).astype(np.float64)
    ref = lvl0.reshape(1024 // d, d, 1024 // d, d, 3).mean((1, 3))
    lvl = render_region(spec, 0, 0, 1024 // d, 1024 // d, d).astype(np.float64)
    err = np.abs(lvl - ref)
    assert err.mean() < 1.0, err.mean()
    assert (
        np.percentile(err, 99) < 16
    )  # tissue edges and outlines are filtered analytically, np.percentile(err, 99)


def test_tissue_background_has_tissue_and_glass() -> None:
    spec = SlideSpec("t", 1024, 1024, 0, "tissue", 1234, (), tissue_scale_px=256.0)
    m = tissue_mask(spec, 0, 0, 256, 256, 4)
    assert 0.1 < (m > 0.5).mean() < 0.9
    img = render_region(spec, 0, 0, 256, 256, 4)
    glass = img[m < 0.01]
    tissue = img[m > 0.99]
    assert glass.mean() > 230 and glass.std() < 6  # near-white, flat glass
    assert (
        tissue.mean() < 200 and (tissue[:, 0].astype(int) - tissue[:, 1]).mean() > 30
    )  # pink/purple
    assert tissue.std() > 10  # textured


def test_noise_background_is_mid_grey_like_the_seed() -> None:
    spec = SlideSpec("n", 1024, 1024, 0, "noise", 5, (), brightness=-3.0)
    img = render_region(spec, 0, 0, 1024, 1024).astype(float)
    assert abs(img.mean() - 124.5) < 1.5
    assert 0.5 < img[..., 0].std() < 4  # the seed's blurred noise is faint
    assert np.corrcoef(img[..., 0].ravel(), img[..., 1].ravel())[0, 1] < 0.5  # channels independent


def test_markers_are_drawn_inside_their_bbox_only() -> None:
    spec = _spec("tissue")
    plain = SlideSpec("t", 1024, 1024, 0, "tissue", 1234, (), tissue_scale_px=256.0)
    a = render_region(spec, 0, 0, 1024, 1024).astype(int)
    b = render_region(plain, 0, 0, 1024, 1024).astype(int)
    changed = np.abs(a - b).max(-1) > 0
    inside = np.zeros_like(changed)
    for m in MARKERS:
        x0, y0, x1, y1 = m.bbox
        inside[y0:y1, x0:x1] = True
        cov = marker_coverage(m, x0, y0, x1 - x0, y1 - y0, 1)
        assert cov.max() == 1.0  # fully opaque somewhere
        assert cov[0].max() < 0.01 and cov[-1].max() < 0.01  # bbox border is clear of ink
        assert cov[:, 0].max() < 0.01 and cov[:, -1].max() < 0.01
    assert changed.any() and not (changed & ~inside).any()
    # an outline leaves its centre untouched; a filled marker does not
    assert not changed[310, 300] and changed[200, 800]
