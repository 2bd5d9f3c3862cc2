"""OpenSlide backend: JPEG tiles of Aperio/generic TIFF levels decoded directly (read_tile).

Every slide here is a real file written by tifffile and read by real OpenSlide; the fast
path must give exactly the pixels of ``read_level_region`` (OpenSlide's read_region) of the
tile window, and every level it does not apply to must read through OpenSlide as before.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from slide_factory import make_pyramidal_tiff, pyramid_levels, test_image

import wsi_mil.slides.backends.openslide_backend as osb
from wsi_mil.config import TileConfig
from wsi_mil.slides import PAD_VALUE, SlideEntry, open_slide
from wsi_mil.tiling import PatchStore, tile_slides
from wsi_mil.tiling.read import read_patches_from_slide

H, W, TILE = 600, 840, 128  # level 1 is 420x300 (downsample exactly 2): full and edge tiles
APERIO_DESC = (
    "Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q=90"
    "|AppMag = 20|MPP = 0.4990"
)


def write_svs(path: Path, img: np.ndarray, colour: str, n_levels: int = 3) -> Path:
    """Aperio-like SVS: tiled JPEG levels with a stripped thumbnail as the 2nd IFD, like Aperio.

    ``colour``: "ycbcr" (tifffile's default JPEG, 2x2 chroma subsampling) or "rgb"
    (RGB-coded JPEG without JFIF marker, as Aperio writes).
    """
    import tifffile

    args: dict = {"level": 90}
    if colour == "rgb":
        args["outcolorspace"] = "rgb"
    levels = pyramid_levels(img, n_levels)
    kw = {"photometric": "rgb", "compression": "jpeg", "compressionargs": args}
    h, w = img.shape[:2]
    with tifffile.TiffWriter(path) as tw:
        desc = APERIO_DESC.format(w=w, h=h, t=TILE)
        tw.write(levels[0], tile=(TILE, TILE), description=desc, metadata=None, **kw)
        thumb = levels[-1]
        tw.write(thumb, rowsperstrip=16, description=desc, metadata=None, **kw)
        for lv in levels[1:]:
            tw.write(lv, tile=(TILE, TILE), subfiletype=1, metadata=None, **kw)
    return path


def write_generic(path: Path, img: np.ndarray, colour: str) -> Path:
    """Generic tiled JPEG TIFF pyramid (OpenSlide vendor "generic-tiff")."""
    if colour == "ycbcr":
        return make_pyramidal_tiff(path, img, 3, TILE, compression="jpeg")
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(pyramid_levels(img, 3)):
            tw.write(
                lv,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90, "outcolorspace": "rgb"},
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )
    return path


CASES = [
    ("generic-tiff", "ycbcr"),
    ("generic-tiff", "rgb"),
    ("aperio", "ycbcr"),
    ("aperio", "rgb"),
]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return test_image(H, W, seed=21)


@pytest.fixture(scope="module")
def jpeg_slides(tmp_path_factory, image) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("fast_tiles")
    out = {}
    for vendor, colour in CASES:
        if vendor == "aperio":
            out[vendor, colour] = write_svs(d / f"{colour}.svs", image, colour)
        else:
            out[vendor, colour] = write_generic(d / f"{colour}.tif", image, colour)
    return out


def assert_tiles_equal_windows(slide, level: int, expect_fast: bool | None) -> None:
    """Every tile of ``level`` equals read_level_region of its window (the in-level part).

    ``expect_fast``: whether each tile must come back in the caller's buffer (None: either).
    """
    grid = slide.tile_grid(level)
    lw, lh = slide.level_dimensions[level]
    buf = np.zeros((grid.tile_h, grid.tile_w, 3), np.uint8)
    for row in range(-(-lh // grid.tile_h)):
        for col in range(-(-lw // grid.tile_w)):
            buf[:] = 7  # stale contents must never leak into a tile
            tile = slide.read_tile(level, col, row, out=buf)
            if expect_fast is not None:
                assert (tile is buf) == expect_fast, (level, col, row)
            x, y = col * grid.tile_w, row * grid.tile_h
            w, h = min(grid.tile_w, lw - x), min(grid.tile_h, lh - y)
            want = slide.read_level_region(level, x, y, w, h)
            np.testing.assert_array_equal(tile[:h, :w], want, err_msg=f"{level} ({col}, {row})")


@pytest.mark.parametrize(("vendor", "colour"), CASES)
def test_fast_tiles_equal_openslide(jpeg_slides, vendor, colour):
    with open_slide(jpeg_slides[vendor, colour], backend="openslide") as slide:
        assert slide.vendor == vendor and slide.level_count == 3
        assert slide.level_downsamples[:2] == [1.0, 2.0]
        for level in (0, 1):
            assert_tiles_equal_windows(slide, level, expect_fast=True)
        assert slide._fast[0] is not None and slide._fast[1] is not None
        # without a buffer the tile is still decoded directly, into a new array
        want = slide.read_level_region(0, TILE, TILE, TILE, TILE)
        np.testing.assert_array_equal(slide.read_tile(0, 1, 1), want)


@pytest.mark.parametrize("colour", ["ycbcr", "rgb"])
def test_tiling_svs_equals_read_region(tmp_path, jpeg_slides, colour):
    path = jpeg_slides["aperio", colour]
    calls = []
    real_decode = osb.OpenSlideSlide._decode_fast

    def counting(self, *a, **kw):  # observes the fast path; OpenSlide itself stays real
        calls.append(1)
        return real_decode(self, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(osb.OpenSlideSlide, "_decode_fast", counting)
    try:
        cfg = TileConfig(
            work=tmp_path / "w",
            tissue="none",
            backend="openslide",
            workers=2,
            patch_size=100,
            stride=90,
        )
        res = tile_slides(cfg, [SlideEntry("s", path)], progress=False)
    finally:
        mp.undo()
    assert res.exit_code == 0 and res.done == ["s"], res.summary()
    assert len(calls) >= 35  # every level-0 tile (7 x 5) went the fast way
    store = PatchStore.open(tmp_path / "w" / "patches" / "s.zarr")
    with open_slide(path, backend="openslide") as ref:
        want = read_patches_from_slide(ref, store.coords, 0, 100, 100)
    np.testing.assert_array_equal(store.pixels(0, len(store)), want)
    assert (want[-1] == PAD_VALUE).all(axis=-1).any()  # the last patch is padded


def test_failed_verification_falls_back(jpeg_slides, monkeypatch):
    monkeypatch.setattr(osb, "_tiles_equal", lambda fast, ref: False)
    with open_slide(jpeg_slides["aperio", "rgb"], backend="openslide") as slide:
        for level in (0, 1):
            assert_tiles_equal_windows(slide, level, expect_fast=False)
        assert slide._fast == {0: None, 1: None}


def test_verification_error_falls_back(jpeg_slides, monkeypatch):
    def broken(fast, ref):
        raise RuntimeError("boom")

    monkeypatch.setattr(osb, "_tiles_equal", broken)
    with open_slide(jpeg_slides["generic-tiff", "ycbcr"], backend="openslide") as slide:
        assert_tiles_equal_windows(slide, 0, expect_fast=False)
        assert slide._fast == {0: None}


def test_verification_runs_once_across_threads(jpeg_slides, monkeypatch):
    seen = []
    real = osb._tiles_equal
    monkeypatch.setattr(osb, "_tiles_equal", lambda a, b: seen.append(1) or real(a, b))
    with open_slide(jpeg_slides["aperio", "ycbcr"], backend="openslide") as slide:
        want = [slide.read_level_region(0, c * TILE, 0, TILE, TILE) for c in range(6)]
        errors: list[BaseException] = []

        def work(c: int) -> None:
            try:
                for _ in range(5):
                    buf = np.empty((TILE, TILE, 3), np.uint8)
                    tile = slide.read_tile(0, c, 0, out=buf)
                    assert tile is buf
                    np.testing.assert_array_equal(tile, want[c])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(c,)) for c in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(seen) == 2  # two tiles verified, once for the level


def test_non_integer_downsample_level_falls_back(tmp_path, image):
    """A level whose tile origins are not exact level-0 pixels: OpenSlide resamples the
    window, so the native tile would differ; that level reads through OpenSlide."""
    import tifffile
    from PIL import Image

    l1 = np.asarray(Image.fromarray(image).resize((209, 151)))  # downsample ~4.0 / 3.97
    p = tmp_path / "odd.tif"
    with tifffile.TiffWriter(p) as tw:
        for i, lv in enumerate((image, l1)):
            tw.write(
                lv,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                subfiletype=i,
                metadata=None,
            )
    with open_slide(p, backend="openslide") as slide:
        assert slide.level_downsamples[1] not in (2.0, 4.0)
        assert_tiles_equal_windows(slide, 0, expect_fast=True)
        assert_tiles_equal_windows(slide, 1, expect_fast=False)


@pytest.mark.parametrize("compression", ["zlib", None])
def test_non_jpeg_levels_take_the_openslide_path(tmp_path, image, compression):
    p = make_pyramidal_tiff(tmp_path / "lossless.tif", image, 2, TILE, compression=compression)
    with open_slide(p, backend="openslide") as slide:
        assert slide.vendor == "generic-tiff"
        assert_tiles_equal_windows(slide, 0, expect_fast=False)
        assert slide._fast == {0: None}
        np.testing.assert_array_equal(
            slide.read_tile(0, 1, 1)[:TILE, :TILE], image[128:256, 128:256]
        )


def test_missing_tile_is_white(tmp_path, image):
    """A zero-length tile: OpenSlide paints it transparent, composited on white."""
    import tifffile

    p = write_svs(tmp_path / "sparse.svs", image, "ycbcr", n_levels=2)
    with tifffile.TiffFile(p, mode="r+") as tf:
        for name in ("TileByteCounts", "TileOffsets"):
            tag = tf.pages[0].tags[name]
            values = list(tag.value)
            values[8] = 0  # tile (1, 1)
            tag.overwrite(values)
    with open_slide(p, backend="openslide") as slide:
        buf = np.zeros((TILE, TILE, 3), np.uint8)
        assert slide.read_tile(0, 0, 0, out=buf) is buf  # the level keeps its fast path
        tile = slide.read_tile(0, 1, 1, out=buf)
        assert tile is not buf and (tile == PAD_VALUE).all()
        assert_tiles_equal_windows(slide, 0, expect_fast=None)


def test_close_releases_the_file(jpeg_slides):
    slide = open_slide(jpeg_slides["aperio", "ycbcr"], backend="openslide")
    slide.read_tile(0, 0, 0)
    assert slide._fd is not None
    slide.close()
    assert slide._fd is None
    slide.close()  # twice is fine
