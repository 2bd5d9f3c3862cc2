"""OME-Zarr: the factory's stores validate with the ome-zarr reader; our reader handles axis layouts."""

from __future__ import annotations

import numpy as np
import pytest
from slide_factory import make_ome_zarr, pyramid_levels, test_image

from wsi_mil.slides import open_slide


@pytest.fixture(scope="module")
def img():
    return test_image(300, 420, seed=5)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes", ["cyx", "tczyx"])
def test_ome_zarr_package_reads_it(tmp_path, img, version, axes):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    p = make_ome_zarr(
        tmp_path / "im.ome.zarr",
        img,
        n_levels=3,
        chunk_px=128,
        mpp=0.25,
        version=version,
        axes=axes,
    )
    loc = parse_url(str(p))
    assert loc is not None, "ome-zarr does not recognise the store"
    assert str(loc.version) == version
    nodes = list(Reader(loc)())
    image = nodes[0]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    assert [tuple(d.shape) for d in image.data] == [
        (1, 3, 1, h, w) if axes == "tczyx" else (3, h, w)
        for (h, w) in [(300, 420), (150, 210), (75, 105)]
    ]
    assert [a["name"] for a in image.metadata["axes"]] == list(axes)
    lvl1 = np.asarray(image.data[1]).reshape(3, 150, 210)
    np.testing.assert_array_equal(np.moveaxis(lvl1, 0, -1), pyramid_levels(img, 2)[1])
    with open_slide(p) as s:
        assert s.backend == "zarr" and s.level_count == 3 and s.mpp == pytest.approx(0.25)


def test_yxc_axes_and_units(tmp_path, img):
    p = make_ome_zarr(
        tmp_path / "yxc.zarr", img, n_levels=2, chunk_px=64, mpp=None, version="0.5", axes="yxc"
    )
    with open_slide(p) as s:
        assert s.mpp is None  # axes without units: unknown
        assert s.tile_grid(0).tile_w == 64
        np.testing.assert_array_equal(
            s.read_region(1, 20, 40, 50, 30), pyramid_levels(img, 2)[1][20:50, 10:60]
        )


def test_nanometer_unit(tmp_path, img):
    import zarr

    p = make_ome_zarr(tmp_path / "nm.zarr", img, n_levels=2, mpp=0.5, version="0.4")
    g = zarr.open_group(str(p), mode="r+")
    ms = g.attrs["multiscales"]
    for a in ms[0]["axes"][1:]:
        a["unit"] = "nanometer"
    for i, ds in enumerate(ms[0]["datasets"]):
        ds["coordinateTransformations"][0]["scale"] = [1.0, 500.0 * 2**i, 500.0 * 2**i]
    g.attrs["multiscales"] = ms
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.5)


def test_bioformats2raw_layout(tmp_path, img):
    import zarr

    root = tmp_path / "b2r.zarr"
    zarr.open_group(str(root), mode="w", zarr_format=2).attrs["bioformats2raw.layout"] = 3
    make_ome_zarr(root / "0", img, n_levels=2, version="0.4")
    with open_slide(root) as s:
        assert s.backend == "zarr" and s.level_count == 2
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 420, 300), img)


@pytest.mark.parametrize("name", ["channel", "ch"])
def test_channel_axis_found_by_its_ngff_type(tmp_path, img, name):
    """NGFF marks the channel axis by "type": "channel"; a name other than "c" was read as
    channel 0 in grey, silently."""
    import json

    p = make_ome_zarr(tmp_path / "t.zarr", img, n_levels=1, chunk_px=128, version="0.5")
    meta_path = p / "zarr.json"
    meta = json.loads(meta_path.read_text())
    axes = meta["attributes"]["ome"]["multiscales"][0]["axes"]
    assert axes[0] == {"name": "c", "type": "channel"}
    axes[0]["name"] = name
    meta_path.write_text(json.dumps(meta))
    with open_slide(p) as s:
        np.testing.assert_array_equal(s.read_region(0, 10, 20, 100, 60), img[20:80, 10:110])
