"""Pure grid maths: level choice, edge patches, level <-> level-0 coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_mil.errors import ConfigError
from wsi_mil.tiling.grid import (
    choose_level,
    grid_level_xy,
    level0_to_level_xy,
    level_to_level0_xy,
    normalised_xy,
)

DS = [1.0, 4.0, 16.0]


def test_default_is_level0_no_resize():
    c = choose_level(DS, 224)
    assert (c.level, c.patch_px, c.patch_px_level, c.stride_level) == (0, 224, 224, 224)
    assert c.downsample == 1.0 and not c.resized


def test_explicit_level_and_stride():
    c = choose_level(DS, 128, stride_px=64, level=1)
    assert (c.level, c.patch_px_level, c.stride_level, c.downsample) == (1, 128, 64, 4.0)
    assert c.patch_px_level0 == 512


def test_mpp_matching_level_within_tolerance():
    # slide 0.25 mpp: level 1 is 1.0 mpp; 1.05 is within 10%
    c = choose_level(DS, 224, target_mpp=1.05, slide_mpp=0.25)
    assert c.level == 1 and not c.resized and c.downsample == 4.0


def test_mpp_between_levels_reads_finer_level_and_resizes():
    # 0.5 mpp on a 0.25 mpp slide: target downsample 2 -> level 0, 448 px read, resized to 224
    c = choose_level(DS, 224, target_mpp=0.5, slide_mpp=0.25)
    assert c.level == 0 and c.patch_px_level == 448 and c.stride_level == 448 and c.resized
    assert c.downsample == pytest.approx(2.0)
    # 8 mpp: between level 1 (1 mpp) and 2 (4 mpp) -> level 2 ... no: 8 mpp = ds 32 > 16
    c = choose_level(DS, 100, target_mpp=8.0, slide_mpp=0.25)
    assert c.level == 2 and c.patch_px_level == 200 and c.downsample == pytest.approx(32.0)
    c = choose_level(DS, 100, target_mpp=2.0, slide_mpp=0.25)  # ds 8: level 1, 200 px
    assert c.level == 1 and c.patch_px_level == 200


def test_mpp_finer_than_level0_upsamples():
    c = choose_level(DS, 224, target_mpp=0.125, slide_mpp=0.25)
    assert c.level == 0 and c.patch_px_level == 112 and c.downsample == pytest.approx(0.5)


def test_bad_choices_raise_config_errors():
    with pytest.raises(ConfigError, match="slide-mpp"):
        choose_level(DS, 224, target_mpp=0.5, slide_mpp=None)
    with pytest.raises(ConfigError, match="level 5"):
        choose_level(DS, 224, level=5)
    with pytest.raises(ConfigError, match="exclusive"):
        choose_level(DS, 224, level=0, target_mpp=0.5, slide_mpp=0.25)
    with pytest.raises(ConfigError):
        choose_level(DS, 0)


def test_grid_keeps_edge_patches_row_major():
    xy = grid_level_xy(250, 130, 100)
    # x: 0, 100, 200 (the last runs past 250); y: 0, 100
    assert xy.dtype == np.int64 and xy.shape == (6, 2)
    assert xy.tolist() == [[0, 0], [100, 0], [200, 0], [0, 100], [100, 100], [200, 100]]
    # the union of patches covers the whole image
    assert (xy[:, 0] + 100).max() >= 250 and (xy[:, 1] + 100).max() >= 130
    assert grid_level_xy(0, 10, 5).shape == (0, 2)


def test_overlapping_stride():
    xy = grid_level_xy(100, 10, 30)
    assert xy[:, 0].tolist() == [0, 30, 60, 90]


@pytest.mark.parametrize("ds", [1.0, 2.0, 4.0, 4.000187, 3.999, 16.0])
def test_level_level0_round_trip(ds):
    lxy = grid_level_xy(5000, 3000, 224)
    l0 = level_to_level0_xy(lxy, ds)
    assert l0.dtype == np.int64
    np.testing.assert_array_equal(level0_to_level_xy(l0, ds), lxy)
    # Slide.read_region's own mapping: int(round(x / ds))
    for x, y in l0[:: max(1, len(l0) // 50)]:
        assert (int(round(x / ds)), int(round(y / ds))) in {tuple(v) for v in lxy.tolist()}


def test_normalised_xy():
    n = normalised_xy(np.array([[0, 0], [50, 25]]), 100, 50)
    assert n.dtype == np.float32
    np.testing.assert_allclose(n, [[0, 0], [0.5, 0.5]])


def test_read_threads_default_is_the_cpus_capped_and_shared_out():
    from wsi_mil.tiling.tile import DEFAULT_MAX_READ_THREADS, read_threads

    assert read_threads(None, cpus=2) == 2
    assert read_threads(None, cpus=64) == DEFAULT_MAX_READ_THREADS  # more stop helping (GIL)
    assert read_threads(None, processes=4, cpus=16) == 4
    assert read_threads(None, processes=4, cpus=2) == 1
    assert read_threads(16, cpus=64) == 16  # asked for: given, not capped
    assert read_threads(16, processes=2, cpus=4) == 8
    assert read_threads(1, processes=3) == 1
