"""--significant-bits: 12-bit camera data stored in uint16 files that do not say so."""

from __future__ import annotations

import csv
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from wsi_mil.errors import SlideError
from wsi_mil.slides import open_slide
from wsi_mil.tiling import PatchStore


def _twelve_bit(h: int = 300, w: int = 420, seed: int = 0) -> np.ndarray:
    """(h, w) uint16 with values 0..4095: dark noisy field, bright nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 100 + rng.normal(0, 20, (h, w))
    for cy, cx in rng.integers(30, [h - 30, w - 30], (12, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 12**2] += 3000
    return np.clip(img, 0, 4095).astype(np.uint16)


def _expected(a: np.ndarray, bits: int) -> np.ndarray:
    return np.repeat(
        np.clip(a.astype(np.int64) >> (bits - 8), 0, 255).astype(np.uint8)[..., None], 3, -1
    )


def _write(kind: str, path: Path, a: np.ndarray) -> Path:
    if kind == "ome-tiff":
        tifffile.imwrite(path, a, ome=True, tile=(128, 128), metadata={"axes": "YX"})
    elif kind == "zarr":
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.create_array("0", data=a, chunks=(128, 128))
        g.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [
                {
                    "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                    "datasets": [
                        {
                            "path": "0",
                            "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}],
                        }
                    ],
                }
            ],
        }
    elif kind == "png-rgb":  # 16-bit RGB PNG (Pillow alone reads only its high bytes)
        path.write_bytes(imagecodecs.png_encode(np.repeat(a[..., None], 3, axis=2)))
    else:
        Image.fromarray(a).save(path)  # 16-bit grey PNG
    return path


@pytest.mark.parametrize(
    ("kind", "name"),
    [("ome-tiff", "a.ome.tif"), ("zarr", "a.ome.zarr"), ("png", "a.png"), ("png-rgb", "c.png")],
)
def test_open_slide_maps_the_top_significant_bits(tmp_path, kind, name):
    a = _twelve_bit()
    path = _write(kind, tmp_path / name, a)
    with open_slide(path) as s:  # the file does not say: top 8 of 16 bits, nearly black
        np.testing.assert_array_equal(
            s.read_region(0, 0, 0, a.shape[1], a.shape[0]), _expected(a, 16)
        )
    with open_slide(path, significant_bits=12) as s:
        got = s.read_region(0, 0, 0, a.shape[1], a.shape[0])
        np.testing.assert_array_equal(got, _expected(a, 12))
        assert got.max() > 180 and s.significant_bits == 12
    with pytest.raises(SlideError, match="8..32"):
        open_slide(path, significant_bits=4)


def test_tile_with_significant_bits_finds_the_cells_and_records_it(tmp_path, cli):
    a = _twelve_bit(512, 640, seed=3)
    path = _write("ome-tiff", tmp_path / "cells.ome.tif", a)
    table = tmp_path / "s.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "path"), ("cells", str(path))])
    args = ("-q", "tile", "--slides", str(table), "--patch-size", "64")
    r = cli(*args, "--work", str(tmp_path / "dark"))
    assert r.returncode == 0, r.stderr
    assert len(PatchStore.open(tmp_path / "dark" / "patches" / "cells.zarr")) == 0  # nearly black
    r = cli(*args, "--work", str(tmp_path / "w"), "--significant-bits", "12")
    assert r.returncode == 0, r.stderr
    store = PatchStore.open(tmp_path / "w" / "patches" / "cells.zarr")
    assert len(store) > 0 and store.attrs["significant_bits"] == 12
    with store.open_slide() as s:  # reopened as tiled: same mapping
        x, y = (int(v) for v in store.coords[0])
        np.testing.assert_array_equal(store.pixels(0, 1)[0], s.read_region(0, x, y, 64, 64))
    r = cli(*args, "--work", str(tmp_path / "w"), "--significant-bits", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_coords_only_store_is_read_back_with_the_recorded_bits(tmp_path, cli):
    """--no-pixels: extract and e2e training reopen the slide; they must map it as tiling
    did (nearly black otherwise), whichever backend they are told to use."""
    from wsi_mil.features.extract import _slide_opener
    from wsi_mil.train.e2e import BagReader

    a = _twelve_bit(512, 640, seed=4)
    path = _write("ome-tiff", tmp_path / "cells.ome.tif", a)
    table = tmp_path / "s.csv"
    with open(table, "w", newline="") as fh:
        csv.writer(fh).writerows([("slide_id", "path"), ("cells", str(path))])
    r = cli("-q", "tile", "--slides", str(table), "--patch-size", "64", "--work", str(tmp_path / "w"),
            "--significant-bits", "12", "--no-pixels")  # fmt: skip
    assert r.returncode == 0, r.stderr
    store = PatchStore.open(tmp_path / "w" / "patches" / "cells.zarr")
    n = len(store)
    want = store.read_patches(0, n)  # through store.open_slide: the recorded bits
    assert n > 0 and want.max() > 180
    for backend in (None, "tiff"):
        with _slide_opener(store, store.slide_path, backend)() as s:
            np.testing.assert_array_equal(store.read_patches(0, n, slide=s), want)
        reader = BagReader(store, None, backend=backend)
        np.testing.assert_array_equal(reader(0, n), want)
        reader.close()


@pytest.mark.parametrize(
    ("kind", "name"),
    [("ome-tiff", "b.ome.tif"), ("zarr", "b.ome.zarr"), ("png", "b.png"), ("png-rgb", "d.png")],
)
def test_more_bits_than_stored_means_the_stored_width(tmp_path, kind, name):
    """24 significant bits in uint16: every backend keeps the stored 16 (not all black)."""
    a = (_twelve_bit().astype(np.uint32) * 16).astype(np.uint16)  # full 16-bit range
    path = _write(kind, tmp_path / name, a)
    with open_slide(path, significant_bits=24) as s:
        got = s.read_region(0, 0, 0, a.shape[1], a.shape[0])
    np.testing.assert_array_equal(got, _expected(a, 16))
