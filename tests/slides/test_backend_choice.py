"""Automatic backend choice and the less common TIFF layouts our tifffile backend handles."""

from __future__ import annotations

import numpy as np
import pytest
from slide_factory import make_image, make_ome_zarr, make_pyramidal_tiff, pyramid_levels, test_image

from wsi_mil.errors import SlideError
from wsi_mil.slides import available_backends, open_slide

IMG = test_image(256, 384, seed=9)


def test_all_backends_registered():
    assert set(available_backends()) == {"openslide", "tiff", "zarr", "image"}


@pytest.mark.parametrize(
    "name,writer,expected",
    [
        ("g.tif", lambda p: make_pyramidal_tiff(p, IMG, 2, 128), "tiff"),
        ("o.ome.tiff", lambda p: make_pyramidal_tiff(p, IMG, 2, 128, ome=True), "tiff"),
        ("s.tif", lambda p: make_pyramidal_tiff(p, IMG, 2, 128, subifds=True), "tiff"),
        ("z.zarr", lambda p: make_ome_zarr(p, IMG, 2, version="0.4"), "zarr"),
        ("noext", lambda p: make_ome_zarr(p, IMG, 2, version="0.5"), "zarr"),
        ("i.jpg", lambda p: make_image(p, IMG), "image"),
        ("i.png", lambda p: make_image(p, IMG), "image"),
        ("i.bmp", lambda p: make_image(p, IMG), "image"),
        ("plain.tif", lambda p: make_image(p, IMG), "tiff"),
        ("misnamed.dat", lambda p: make_pyramidal_tiff(p, IMG, 2, 128), "tiff"),
    ],
)
def test_auto_choice(tmp_path, name, writer, expected):
    p = writer(tmp_path / name)
    with open_slide(p) as s:
        assert s.backend == expected
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 100, 60)[:, :, 0] > -1, True)


def test_aperio_svs_goes_to_openslide(tmp_path):
    desc = "Aperio Image Library v12.0.15\r\n384x256 [0,0 384x256] (128x128) JPEG/RGB Q=90|AppMag = 20|MPP = 0.4990"
    p = make_pyramidal_tiff(tmp_path / "fake.svs", IMG, 2, 128, mpp=None, description=desc)
    with open_slide(p) as s:
        assert s.backend == "openslide" and s.vendor == "aperio" and s.mpp == pytest.approx(0.499)
    with open_slide(p, backend="tiff") as s:  # forced: reads Aperio's MPP from the description
        assert s.mpp == pytest.approx(0.499)


def test_unknown_backend_name(tmp_path):
    p = make_image(tmp_path / "i.png", IMG)
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(p, backend="bogus")


@pytest.mark.parametrize(
    "kw",
    [
        {"planar": True},
        {"extra_alpha": True},
        {"ome": True, "planar": True},
        {"tile_px": 64, "n_levels": 3},
    ],
)
def test_tiff_layouts_exact(tmp_path, kw):
    args = {"n_levels": 2, "tile_px": 128, "compression": "zlib", **kw}
    p = make_pyramidal_tiff(tmp_path / ("x.ome.tif" if kw.get("ome") else "x.tif"), IMG, **args)
    ref = pyramid_levels(IMG, args["n_levels"])
    with open_slide(p, backend="tiff") as s:
        for level, lv in enumerate(ref):
            lw, lh = s.level_dimensions[level]
            np.testing.assert_array_equal(s.read_region(level, 0, 0, lw, lh), lv)


def test_grayscale_tiff_becomes_rgb(tmp_path):
    gray = IMG[..., 1]
    p = make_pyramidal_tiff(tmp_path / "g.tif", gray, n_levels=2, tile_px=128, compression="zlib")
    with open_slide(p) as s:
        got = s.read_region(0, 10, 20, 50, 40)
        np.testing.assert_array_equal(got, np.repeat(gray[20:60, 10:60, None], 3, axis=2))


def test_strip_tiff_reads_without_tiles(tmp_path):
    import tifffile

    p = tmp_path / "strips.tif"
    tifffile.imwrite(p, IMG, photometric="rgb", rowsperstrip=16, compression="zlib")
    with open_slide(p) as s:
        assert s.backend == "tiff" and s.tile_grid(0) is None
        np.testing.assert_array_equal(s.read_region(0, 33, 47, 120, 100), IMG[47:147, 33:153])
        np.testing.assert_array_equal(
            s.read_region(0, 300, 200, 120, 100)[:56, :84], IMG[200:256, 300:384]
        )


def test_16bit_ome_tiff_scaled_to_uint8(tmp_path):
    import tifffile

    p = tmp_path / "u16.ome.tif"
    data = IMG.astype(np.uint16) * 257
    tifffile.imwrite(
        p,
        data,
        photometric="rgb",
        tile=(128, 128),
        metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"},
    )
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 384, 256), IMG)


def test_tile_cache_bounded(tmp_path):
    p = make_pyramidal_tiff(tmp_path / "c.tif", IMG, 1, 64, compression="zlib")
    with open_slide(p) as s:
        s.cache_bytes = 64 * 64 * 3 * 4  # four tiles
        for y in range(0, 256, 64):
            for x in range(0, 384, 64):
                s.read_region(0, x, y, 64, 64)
        assert len(s._cache) <= 4 and s._cache_used <= s.cache_bytes


def test_image_backend_exif_and_alpha(tmp_path):
    from PIL import Image

    rgba = np.dstack([IMG, np.full(IMG.shape[:2], 255, np.uint8)])
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as s:
        px = s.read_region(0, 0, 0, 20, 20)
        assert (px[:10, :10] == 255).all()
        np.testing.assert_array_equal(px[10:, 10:], IMG[10:20, 10:20])
    im = Image.fromarray(IMG)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    with open_slide(tmp_path / "r.jpg") as s:
        assert s.dimensions == (256, 384)


@pytest.mark.parametrize("kind", ["tif", "zarr", "png", "openslide"])
def test_slides_pickle_by_reopening(tmp_path, kind):
    import pickle

    p = {
        "tif": lambda: make_pyramidal_tiff(tmp_path / "a.tif", IMG, 2, 128, compression="zlib"),
        "openslide": lambda: make_pyramidal_tiff(
            tmp_path / "a.tif", IMG, 2, 128, compression="zlib"
        ),
        "zarr": lambda: make_ome_zarr(tmp_path / "a.zarr", IMG, 2),
        "png": lambda: make_image(tmp_path / "a.png", IMG),
    }[kind]()
    with open_slide(p, backend="openslide" if kind == "openslide" else None, mpp=0.7) as s:
        s2 = pickle.loads(pickle.dumps(s))
        assert type(s2) is type(s) and s2.mpp == 0.7
        np.testing.assert_array_equal(
            s2.read_region(0, 3, 4, 50, 40), s.read_region(0, 3, 4, 50, 40)
        )
        s2.close()


def test_tiff_reads_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    p = make_pyramidal_tiff(tmp_path / "t.tif", IMG, 1, 64, compression="zlib")
    with open_slide(p) as s:
        s.cache_bytes = 64 * 64 * 3 * 3
        xy = [(x, y) for y in range(0, 256, 32) for x in range(0, 384, 32)] * 4
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda q: s.read_region(0, q[0], q[1], 70, 50), xy))
        for (x, y), g in zip(xy, got, strict=True):
            exp = np.full((50, 70, 3), 255, np.uint8)
            sub = IMG[y : y + 50, x : x + 70]
            exp[: sub.shape[0], : sub.shape[1]] = sub
            np.testing.assert_array_equal(g, exp)
