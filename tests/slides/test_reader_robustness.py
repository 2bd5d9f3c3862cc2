"""Readers against odd files a fuzz tester found: anisotropic levels, < 8-bit grey, non-finite
mpp, empty OME-Zarr levels, FIFOs and devices as slides, malformed NGFF metadata."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_factory import make_ome_zarr, make_pyramidal_tiff, test_image

from wsi_mil.errors import SlideError
from wsi_mil.slides import open_slide
from wsi_mil.slides.backends._util import level_downsample_range, valid_mpp
from wsi_mil.slides.info import slide_info

CYX = [
    {"name": "c", "type": "channel"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]


def _zarr(path: Path, levels: list[np.ndarray], ms: dict | list | None = None) -> Path:
    """OME-Zarr 0.5 of (h, w, 3) ``levels``; ``ms`` replaces the generated multiscales."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for i, lv in enumerate(levels):
        a = np.ascontiguousarray(np.moveaxis(lv, -1, 0))
        z = root.create_array(
            str(i), shape=a.shape, dtype="uint8", chunks=(3, 64, 64), dimension_names=list("cyx")
        )
        if a.size:
            z[...] = a
        h0, w0 = levels[0].shape[:2]
        sy = 0.5 * h0 / max(lv.shape[0], 1)
        sx = 0.5 * w0 / max(lv.shape[1], 1)
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, sy, sx]}]}
        )
    if ms is None:
        ms = [{"axes": CYX, "datasets": datasets}]
    root.attrs["ome"] = {"version": "0.5", "multiscales": ms}
    return path


def _box(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))


# -- 1. anisotropic levels ---------------------------------------------------------


def test_level_downsample_range():
    assert level_downsample_range((1200, 999), (600, 500))  # 999 / 2 rounded up
    assert level_downsample_range((1200, 999), (400, 333))  # non-power-of-two 3
    assert level_downsample_range((1000, 700), (3, 2))  # tiny levels: anything near
    assert level_downsample_range((840, 5), (26, 1))  # max(1, h >> 5)
    assert level_downsample_range((1200, 999), (600, 333)) is None  # 2 in x, 3 in y
    assert level_downsample_range((1200, 999), (600, 0)) is None  # empty


def test_zarr_anisotropic_level_dropped(tmp_path, caplog):
    img = test_image(999, 1200, seed=1)
    aniso, good = _box(img, 600, 333), _box(img, 300, 250)
    p = _zarr(tmp_path / "aniso.zarr", [img, aniso, good])
    with caplog.at_level(logging.DEBUG, logger="wsi_mil.slides"), open_slide(p) as s:
        assert s.level_dimensions == [(1200, 999), (300, 250)]
        assert s.level_downsamples[1] == pytest.approx((4 + 999 / 250) / 2)
        np.testing.assert_array_equal(s.read_level_region(1, 0, 0, 300, 250), good)
    assert any("'1'" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)


def test_ome_tiff_anisotropic_subifd_level_dropped(tmp_path, caplog):
    img = test_image(999, 1200, seed=1)
    aniso, good = _box(img, 600, 333), _box(img, 300, 250)
    p = tmp_path / "aniso.ome.tiff"
    with tifffile.TiffWriter(p, ome=True) as tw:
        md = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
        tw.write(img, subifds=2, tile=(256, 256), compression="zlib", metadata=md)
        for lv in (aniso, good):
            tw.write(lv, subfiletype=1, tile=(256, 256), compression="zlib")
    with caplog.at_level(logging.DEBUG, logger="wsi_mil.slides"), open_slide(p) as s:
        assert s.backend == "tiff"
        assert s.level_dimensions == [(1200, 999), (300, 250)]
        np.testing.assert_array_equal(s.read_level_region(1, 0, 0, 300, 250), good)
    assert any("600 x 333" in r.getMessage() for r in caplog.records)


def test_rounded_non_power_of_two_levels_kept(tmp_path):
    img = test_image(999, 1201, seed=2)
    levels = [img, _box(img, 601, 500), _box(img, 400, 333), _box(img, 150, 124)]
    with open_slide(_zarr(tmp_path / "ok.zarr", levels)) as s:
        assert s.level_dimensions == [lv.shape[1::-1] for lv in levels]


# -- 2. samples narrower than 8 bits ------------------------------------------------


def _ramp(bits: int) -> np.ndarray:
    n = 1 << bits
    return np.tile(np.arange(n, dtype=np.uint8).repeat(256 // n), (64, 1))  # 64 x 256


def _expected(bits: int) -> np.ndarray:
    n = 1 << bits
    return np.round(np.arange(n) * 255 / (n - 1)).astype(np.uint8).repeat(256 // n)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("tiled", [True, False])
def test_low_bit_gray_stretched(tmp_path, bits, tiled):
    p = tmp_path / f"g{bits}.tiff"
    kw = {"tile": (64, 64)} if tiled else {"rowsperstrip": 16}
    tifffile.imwrite(p, _ramp(bits), bitspersample=bits, photometric="minisblack", **kw)
    with open_slide(p) as s:
        assert s.backend == "tiff"
        got = s.read_level_region(0, 0, 0, 256, 64)
    np.testing.assert_array_equal(got[10, :, 0], _expected(bits))
    assert np.all(got == got[..., :1])


def test_low_bit_miniswhite_and_sparse_tiles(tmp_path):
    p = tmp_path / "w4.tiff"
    tifffile.imwrite(p, _ramp(4), bitspersample=4, photometric="miniswhite", tile=(64, 64))
    with open_slide(p) as s:
        np.testing.assert_array_equal(
            s.read_level_region(0, 0, 0, 256, 64)[5, :, 0], 255 - _expected(4)
        )


def test_bilevel_still_black_and_white(tmp_path):
    b = (np.arange(256)[None, :] % 3 == 0).repeat(64, 0)
    for photometric, white in (("minisblack", True), ("miniswhite", False)):
        p = tmp_path / f"b_{photometric}.tiff"
        tifffile.imwrite(p, b, photometric=photometric, tile=(64, 64))
        with open_slide(p) as s:
            row = s.read_level_region(0, 0, 0, 256, 64)[3, :, 0]
        np.testing.assert_array_equal(row, np.where(b[0] == white, 255, 0))


def test_low_bit_palette_not_stretched(tmp_path):
    cmap = np.zeros((3, 256), np.uint16)  # (tifffile writes 2**8 entries for uint8 data)
    cmap[0, :16] = np.arange(16) * 4369  # red ramp 0..65535
    cmap[2, :16] = 65535 - cmap[0, :16]
    p = tmp_path / "p4.tiff"
    tifffile.imwrite(
        p, _ramp(4), bitspersample=4, photometric="palette", colormap=cmap, tile=(64, 64)
    )
    with open_slide(p) as s:
        row = s.read_level_region(0, 0, 0, 256, 64)[0]
    np.testing.assert_array_equal(row[:, 0], _expected(4))
    np.testing.assert_array_equal(row[:, 2], 255 - _expected(4))


# -- 3. non-finite / absurd mpp -------------------------------------------------------


def test_valid_mpp():
    assert valid_mpp("0.25") == 0.25 and valid_mpp(1e3) == 1e3
    for bad in ("inf", "nan", "-1", 0, 1e300, 1e-9, None, "x"):
        assert valid_mpp(bad) is None


@pytest.mark.parametrize("value", ["inf", "1e300", "0"])
def test_aperio_mpp_garbage_is_unknown(tmp_path, value):
    img = test_image(300, 400, seed=1)
    desc = f"Aperio Image Library v12\n400x300 -> 400x300|MPP = {value}|AppMag = 20"
    p = make_pyramidal_tiff(tmp_path / "a.svs", img, 2, 64, None, "jpeg", description=desc)
    for backend in ("openslide", "tiff"):
        with open_slide(p, backend=backend) as s:
            assert s.native_mpp is None and s.mpp is None, backend
    info = slide_info(p)
    json.dumps(info, allow_nan=False)  # strict JSON
    assert info["mpp"] is None and info["native_mpp"] is None


def _ome_tiff(path: Path, **md: object) -> Path:
    """Single-level tiled OME-TIFF without TIFF resolution tags (mpp only from OME ``md``)."""
    img = test_image(128, 128, seed=1)
    tifffile.imwrite(path, img, ome=True, tile=(64, 64), metadata={"axes": "YXS", **md})
    return path


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, 1e300])
def test_ome_physical_size_garbage_is_unknown(tmp_path, value):
    p = _ome_tiff(tmp_path / "o.ome.tif", PhysicalSizeX=0.5, PhysicalSizeY=0.5)
    xml = tifffile.TiffFile(p).ome_metadata
    assert 'PhysicalSizeX="0.5"' in xml
    with open_slide(p) as s:
        assert s.backend == "tiff" and s.native_mpp == 0.5
    tifffile.tiffcomment(p, xml.replace('PhysicalSizeX="0.5"', f'PhysicalSizeX="{value}"'))
    with open_slide(p) as s:
        assert s.native_mpp is None
        json.dumps(slide_info(p), allow_nan=False)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, 1e300])
def test_zarr_scale_garbage_is_unknown(tmp_path, value):
    import zarr

    p = make_ome_zarr(tmp_path / "z.zarr", test_image(128, 128, seed=1), 2, 64, 0.5, "0.4")
    root = zarr.open_group(str(p), mode="r+")
    ms = root.attrs["multiscales"]
    ms[0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1.0, value, value]
    root.attrs["multiscales"] = ms
    with open_slide(p) as s:
        assert s.native_mpp is None
        json.dumps(s.properties(), allow_nan=False)


def test_non_finite_override_refused(tmp_path):
    p = make_pyramidal_tiff(tmp_path / "s.tif", test_image(128, 128), 1, 64, 0.5, "zlib")
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(SlideError, match="positive finite"):
            open_slide(p, mpp=bad)


# -- 4. empty OME-Zarr levels ------------------------------------------------------


def test_zarr_empty_level_dropped(tmp_path):
    img = test_image(100, 120, seed=3)
    empty = np.zeros((0, 0, 3), np.uint8)
    p = _zarr(tmp_path / "z.zarr", [img, empty, _box(img, 30, 25)])
    with open_slide(p) as s:
        assert s.level_dimensions == [(120, 100), (30, 25)]
        info = slide_info(p)
        assert info["level_count"] == 2
        assert s.thumbnail(40).shape == (33, 40, 3)


def test_zarr_empty_level0_is_an_error(tmp_path):
    p = _zarr(tmp_path / "z.zarr", [np.zeros((0, 50, 3), np.uint8)])
    with pytest.raises(SlideError, match="image is empty"):
        open_slide(p)


# -- 5. FIFOs and devices ----------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.tiff"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            open_slide(fifo).close()
            result.append(None)
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # a reader is blocked opening the FIFO: release it, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail("open_slide blocked on a FIFO")
    assert isinstance(result[0], SlideError) and "not a regular file" in str(result[0])
    for backend in ("openslide", "tiff", "zarr", "image"):  # naming a backend: refused too
        with pytest.raises(SlideError, match="not a regular file"):
            open_slide(fifo, backend=backend)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_character_device_refused():
    with pytest.raises(SlideError, match="not a regular file.*character device"):
        open_slide("/dev/null")


# -- 6. malformed NGFF metadata ------------------------------------------------------


def test_ngff_multiscales_dict(tmp_path):
    p = _zarr(tmp_path / "d.zarr", [test_image(64, 64)], ms={"axes": ["c", "y", "x"]})
    with pytest.raises(SlideError, match=r"'ome.multiscales' is dict .*expected a list"):
        open_slide(p)


def test_ngff_scale_shorter_than_axes(tmp_path):
    ms = [
        {
            "axes": CYX,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.5]}]}
            ],
        }
    ]
    p = _zarr(tmp_path / "s.zarr", [test_image(64, 64)], ms=ms)
    with pytest.raises(
        SlideError,
        match=r"datasets\[0\]\.coordinateTransformations\[0\]\.scale' is list \[0\.5\], "
        r"expected a list of 3 numbers",
    ):
        open_slide(p)


@pytest.mark.parametrize(
    ("ms", "key"),
    [
        ([{"axes": CYX, "datasets": {"path": "0"}}], r"'ome.multiscales\[0\].datasets' is dict"),
        ([{"axes": CYX, "datasets": [{"p": "0"}]}], r"'ome.multiscales\[0\].datasets\[0\]' is"),
        ([{"axes": "cyx", "datasets": [{"path": "0"}]}], r"'ome.multiscales\[0\].axes' is str"),
        ([{"axes": [1, 2, 3], "datasets": [{"path": "0"}]}], r"axes\[0\]' is int"),
        (["x"], r"'ome.multiscales\[0\]' is str"),
    ],
)
def test_ngff_bad_keys_named(tmp_path, ms, key):
    p = _zarr(tmp_path / "b.zarr", [test_image(64, 64)], ms=ms)
    with pytest.raises(SlideError, match=key):
        open_slide(p)


# -- 7. units, non-square pixels, wording ---------------------------------------------


@pytest.mark.parametrize(("unit", "size", "mpp"), [("pm", 250000, 0.25), ("in", 1e-5, 0.254)])
def test_ome_units_pm_and_in(tmp_path, unit, size, mpp):
    p = make_pyramidal_tiff(
        tmp_path / "u.ome.tif", test_image(128, 128), 1, 64, 0.5, "zlib", ome=True
    )
    xml = tifffile.TiffFile(p).ome_metadata
    xml = xml.replace('PhysicalSizeX="0.5"', f'PhysicalSizeX="{size}"')
    xml = xml.replace('PhysicalSizeXUnit="µm"', f'PhysicalSizeXUnit="{unit}"')
    tifffile.tiffcomment(p, xml.encode())
    with open_slide(p) as s:
        assert s.native_mpp == pytest.approx(mpp)


def test_ome_non_square_pixels_warn_and_use_x(tmp_path, caplog):
    p = make_pyramidal_tiff(
        tmp_path / "n.ome.tif", test_image(128, 128), 1, 64, 0.5, "zlib", ome=True
    )
    xml = tifffile.TiffFile(p).ome_metadata
    tifffile.tiffcomment(p, xml.replace('PhysicalSizeY="0.5"', 'PhysicalSizeY="0.7"').encode())
    with caplog.at_level(logging.WARNING, logger="wsi_mil.slides"), open_slide(p) as s:
        assert s.native_mpp == pytest.approx(0.5)
    assert any("not square" in r.getMessage() for r in caplog.records)


def test_missing_level_message_singular(tmp_path):
    p = make_pyramidal_tiff(tmp_path / "s.tif", test_image(128, 128), 1, 64, 0.5, "zlib")
    with open_slide(p) as s, pytest.raises(SlideError, match=r"has 1 level\)"):
        s.read_region(1, 0, 0, 8, 8)


def test_levels_padded_to_whole_tiles_are_kept():
    """Some writers pad every level to whole tiles: 46000 x 32914 -> 23040 x 16512 is one
    downsample (0.2 % apart in x and y), not an anisotropic level."""
    from wsi_mil.slides.backends._util import consistent_level

    assert consistent_level((46000, 32914), (23040, 16512))
    assert consistent_level((46000, 32914), (11500, 8228))  # rounding
    assert not consistent_level((1200, 1000), (600, 333))  # 1/2 wide, 1/3 high
    assert not consistent_level((1200, 1000), (0, 0))
