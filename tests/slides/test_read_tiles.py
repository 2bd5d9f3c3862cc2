"""Slide.read_tiles: native tiles in runs, adjacent tiles read from the file with one call.

Real JPEG-tiled TIFFs (tifffile), real OpenSlide; ``os.pread`` is only counted, never faked.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from slide_factory import make_pyramidal_tiff, test_image

import wsi_mil.slides.backends._util as util
from wsi_mil.errors import SlideError
from wsi_mil.slides import open_slide
from wsi_mil.slides.backends._util import byte_runs, read_segments

TILE = 64


@pytest.fixture(scope="module")
def jpeg_tiff(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "s.tiff"
    return make_pyramidal_tiff(path, test_image(300, 420, seed=3), 2, TILE, compression="jpeg")


# ---------------------------------------------------------------- byte_runs (pure)
def test_byte_runs_joins_adjacent_segments_only():
    # 0-2 back to back; 3 after a 5-byte gap; 4 missing (offset and length 0, as in TIFF);
    # 5 before 3's end (backwards)
    offsets = [100, 110, 130, 155, 0, 120]
    counts = [10, 20, 20, 5, 0, 3]
    assert byte_runs(offsets, counts, max_gap=0) == [
        (0, 3, 100, 150),
        (3, 4, 155, 160),
        (4, 5, 0, 0),
        (5, 6, 120, 123),
    ]
    assert byte_runs(offsets, counts, max_gap=5)[0] == (0, 4, 100, 160)
    # a run never spans more than max_bytes (a segment longer than that is a run alone)
    assert byte_runs([8, 18, 28, 38], [10, 10, 10, 50], max_gap=0, max_bytes=20) == [
        (0, 2, 8, 28),
        (2, 3, 28, 38),
        (3, 4, 38, 88),
    ]
    assert byte_runs([], []) == []


def test_read_segments_equals_pread_of_each(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    offsets = [10, 30, 60, 0, 4000, 4100, 4990]
    counts = [20, 30, 5, 0, 100, 50, 40]  # the last runs 30 bytes past the end of the file
    fd = os.open(path, os.O_RDONLY)
    try:
        got = list(read_segments(fd, offsets, counts))
    finally:
        os.close(fd)
    assert got[3] is None
    for o, c, g in zip(offsets, counts, got, strict=True):
        if c:
            assert bytes(g) == data[o : o + c]
    assert len(got[-1]) == 10  # short: the caller reports the truncation


# ---------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_read_tiles_equals_read_tile_with_fewer_reads(monkeypatch, jpeg_tiff, backend):
    calls = []
    real = util.os.pread

    def counting(fd, n, off):
        calls.append(n)
        return real(fd, n, off)

    with open_slide(jpeg_tiff, backend=backend) as slide:
        grid = slide.tile_grid(0)
        n_across, n_down = -(-420 // grid.tile_w), -(-300 // grid.tile_h)
        tiles = [(c, r) for r in range(n_down) for c in range(n_across)]  # edge tiles too
        want = [slide.read_tile(0, c, r).copy() for c, r in tiles]
        monkeypatch.setattr(util.os, "pread", counting)
        out = np.empty((grid.tile_h, grid.tile_w, 3), np.uint8)
        # row-major (adjacent in the file), then out of order: the same pixels either way
        for order in (tiles, tiles[::-3] + tiles[1::3]):
            calls.clear()
            for (c, r), tile in zip(order, slide.read_tiles(0, order, out=out), strict=True):
                np.testing.assert_array_equal(tile, want[tiles.index((c, r))])
            if order is tiles:
                assert 0 < len(calls) < len(tiles) / 4, "adjacent tiles were read one by one"


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_file_cut_after_opening(tmp_path, jpeg_tiff, backend):
    """A slide truncated while open (re-copied under a running job): the tiles before the
    cut still decode; the tiff backend reports the cut tile, OpenSlide's fallback fails."""
    path = tmp_path / "cut.tiff"
    path.write_bytes(jpeg_tiff.read_bytes())
    with open_slide(path, backend="tiff") as probe:
        offset = int(probe._levels[0].pages[0].dataoffsets[5])
    with open_slide(path, backend=backend) as slide:
        out = np.empty((TILE, TILE, 3), np.uint8)
        want = [slide.read_tile(0, c, 0).copy() for c in range(5)]
        os.truncate(path, offset + 10)  # tile 5 keeps 10 bytes, the rest of level 0 is gone
        got = slide.read_tiles(0, [(c, 0) for c in range(7)], out=out)
        for c in range(5):
            np.testing.assert_array_equal(next(got), want[c])
        with pytest.raises(SlideError, match="tile 5 is truncated" if backend == "tiff" else None):
            next(got)


def test_tiles_outside_the_grid_and_corrupt_tiles_in_a_run(tmp_path, jpeg_tiff):
    path = tmp_path / "bad.tiff"
    path.write_bytes(jpeg_tiff.read_bytes())
    with open_slide(path, backend="tiff") as probe:
        page = probe._levels[0].pages[0]
        offset, count = int(page.dataoffsets[3]), int(page.databytecounts[3])
        with pytest.raises(ValueError, match=r"tile \(0, 5\) is outside level 0"):
            list(probe.read_tiles(0, [(0, 0), (0, 5)]))
        with pytest.raises(ValueError, match="outside"):
            probe.read_tile(0, -1, 0)
    with open(path, "r+b") as f:  # tile 3 of row 0: garbage in the middle of a run
        f.seek(offset + 2)
        f.write(b"\x00\xff" * ((count - 4) // 2))
    with open_slide(path, backend="tiff") as slide:
        out = np.empty((TILE, TILE, 3), np.uint8)
        got = slide.read_tiles(0, [(c, 0) for c in range(6)], out=out)
        for _ in range(3):
            next(got)
        with pytest.raises(SlideError, match=r"tile \(3, 0\)"):
            next(got)
