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


def test_info_backend_and_slide_mpp_override(cli, good):
    r = cli("info", "--json", "--backend", "openslide", "--slide-mpp", "0.3", str(good["tif"]))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["backend"] == "openslide" and d["vendor"] == "generic-tiff"
    assert d["mpp"] == 0.3 and d["native_mpp"] == pytest.approx(0.5)
    r = cli("info", "--slide-mpp", "0.3", str(good["tif"]))
    assert "0.3 µm/px (override; file says 0.5)" in r.stdout, r.stderr
    r = cli("info", str(good["jpg"]))
    assert "unknown (pass --slide-mpp to set it)" in r.stdout, r.stderr
    r = cli("info", "--slide-mpp", "0", str(good["tif"]))
    assert r.returncode == 2 and "--slide-mpp must be" in r.stderr and "> 0" in r.stderr


def _info_mpp(cli, tmp_path, config: str, *args: str) -> float:
    (tmp_path / "c.yaml").write_text(config)
    r = cli("info", "--json", "--config", str(tmp_path / "c.yaml"), *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["mpp"]


def test_info_config_mpp_is_tiles_target_and_slide_mpp_the_override(cli, good, tmp_path):
    """--mpp is tile's target resolution; a config shared with tile (top-level mpp: 1.0)
    made info report the slide as 1 µm/px. info's override is --slide-mpp, like tile's."""
    tif = str(good["tif"])
    assert _info_mpp(cli, tmp_path, "mpp: 1.0\n", tif) == pytest.approx(0.5)
    assert _info_mpp(cli, tmp_path, "slide-mpp: 0.3\n", tif) == 0.3
    assert _info_mpp(cli, tmp_path, "mpp: 1.0\nslide_mpp: 0.3\n", tif) == 0.3
    assert _info_mpp(cli, tmp_path, "info:\n  slide-mpp: 0.3\n", tif) == 0.3
    assert _info_mpp(cli, tmp_path, "slide-mpp: 0.3\n", "--slide-mpp", "0.2", tif) == 0.2
    # info has no --mpp option for a config key to set
    (tmp_path / "c.yaml").write_text("info:\n  mpp: 1.0\n")
    r = cli("info", "--config", str(tmp_path / "c.yaml"), tif)
    assert r.returncode == 2 and "unknown option(s) for 'info': mpp" in r.stderr


def test_info_old_mpp_flag_still_works_with_a_warning(cli, good):
    for args in (["--mpp", "0.3"], ["--mpp=0.3"]):
        r = cli("info", "--json", *args, str(good["tif"]))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["mpp"] == 0.3
        assert "use --slide-mpp" in r.stderr
    r = cli("info", "--help")
    assert "--slide-mpp" in r.stdout and "--mpp" not in r.stdout.replace("--slide-mpp", "")


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
