"""`wsi-mil info` through the real CLI: good slides, overrides, and every kind of bad input."""

from __future__ import annotations

import json

import pytest
from slide_factory import make_image, make_ome_zarr, make_pyramidal_tiff, test_image


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("info")
    img = test_image(200, 300, seed=1)
    return {
        "tif": make_pyramidal_tiff(d / "a.tif", img, n_levels=2, tile_px=128, mpp=0.5),
        "zarr": make_ome_zarr(
            d / "a.ome.zarr", img, n_levels=2, chunk_px=64, mpp=0.25, version="0.5"
        ),
        "jpg": make_image(d / "a.jpg", img),
    }


def test_info_table(cli, good):
    r = cli("info", str(good["tif"]))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "backend:  tiff" in out and "300 x 200 px" in out and "0.5 µm/px" in out
    assert "128x128" in out and "levels:   2" in out


@pytest.mark.parametrize(
    "kind,backend,mpp,levels,tile",
    [
        ("tif", "tiff", 0.5, 2, [128, 128]),
        ("zarr", "zarr", 0.25, 2, [64, 64]),
        ("jpg", "image", None, 1, None),
    ],
)
def test_info_json(cli, good, kind, backend, mpp, levels, tile):
    r = cli("info", "--json", str(good[kind]))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["backend"] == backend and d["mpp"] == mpp and d["level_count"] == levels
    assert d["level_dimensions"][0] == [300, 200]
    assert d["level_downsamples"][0] == 1.0
    assert d["tile_grid"][0] == tile


def test_info_backend_and_mpp_override(cli, good):
    r = cli("info", "--json", "--backend", "openslide", "--mpp", "0.3", str(good["tif"]))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["backend"] == "openslide" and d["vendor"] == "generic-tiff"
    assert d["mpp"] == 0.3 and d["native_mpp"] == pytest.approx(0.5)


def test_info_backend_that_cannot_read(cli, good):
    r = cli("info", "--backend", "zarr", str(good["jpg"]))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(good["jpg"]) in r.stderr


def _bad_inputs(d):
    img = test_image(300, 300, seed=3)
    full = make_pyramidal_tiff(d / "full.tif", img, n_levels=2, tile_px=128).read_bytes()
    (d / "truncated.tif").write_bytes(full[: len(full) // 2])
    (d / "text.svs").write_text("this is not a slide\n")
    (d / "notes.xyz").write_text("hello\n")
    import zarr

    zarr.open_group(str(d / "empty.zarr"), mode="w")
    (d / "bare.zarr").mkdir()
    return {
        "missing": (d / "nope.svs", "not found"),
        "text-svs": (d / "text.svs", "does not recognise"),
        "truncated-tiff": (d / "truncated.tif", "truncated"),
        "empty-zarr": (d / "empty.zarr", "multiscales"),
        "bare-zarr-folder": (d / "bare.zarr", "zarr"),
        "unknown-format": (d / "notes.xyz", "unknown or unsupported format"),
    }


@pytest.mark.parametrize(
    "kind",
    ["missing", "text-svs", "truncated-tiff", "empty-zarr", "bare-zarr-folder", "unknown-format"],
)
def test_bad_input_one_clear_line(cli, tmp_path, kind):
    path, phrase = _bad_inputs(tmp_path)[kind]
    r = cli("info", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert str(path) in lines[0] and phrase in lines[0], lines[0]
