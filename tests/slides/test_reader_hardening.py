"""Readers against files real users have that the other tests do not write: uncompressed
one-strip TIFFs (tifffile's and Pillow's default), vendor TIFFs OpenSlide detects but cannot
open, OME-Zarr HCS plates, level arrays, plain arrays and zips with the image in a folder,
float images of 8-bit or camera values, TIFF resolutions in micrometres, empty files and
folders of slides given as a slide."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_factory import test_image

from wsi_mil.slides import open_slide

IMG = test_image(300, 410, seed=9)  # 410 x 300: no side a multiple of the 512 px block


def _expected_window(img: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """``img``'s (h, w, 3) window at (x, y), white outside the image."""
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, img.shape[1]), min(y + h, img.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = img[y0:y1, x0:x1]
    return out


# -- uncompressed strips --------------------------------------------------------------


def test_uncompressed_one_strip_tiff_reads_a_window_without_the_whole_image(tmp_path):
    """tifffile.imwrite and Pillow write an uncompressed image as ONE strip: reading a small
    window must not decode (allocate) the whole image, which for a stitched mosaic of
    gigabytes runs out of memory (once per read thread)."""
    big = np.zeros((2000, 3000, 3), np.uint8)  # 18 MB
    big[1000:1100, 1500:1600] = (10, 200, 30)
    path = tmp_path / "mosaic.tif"
    tifffile.imwrite(path, big)
    assert len(tifffile.TiffFile(path).pages[0].dataoffsets) == 1
    with open_slide(path) as s:
        assert s.backend == "tiff"
        tracemalloc.start()
        try:
            win = s.read_region(0, 1500, 1000, 100, 100)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (win == (10, 200, 30)).all()
    assert peak < 4 << 20, f"reading a 100 x 100 window allocated {peak / 2**20:.1f} MB"


def _chw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, -1, 0))


RAW_LAYOUTS = {
    "rgb-one-strip": (lambda p: tifffile.imwrite(p, IMG), IMG),
    "rgb-pillow": (lambda p: Image.fromarray(IMG).save(p), IMG),
    "rgb-strips-of-7-rows": (lambda p: tifffile.imwrite(p, IMG, rowsperstrip=7), IMG),
    "rgb-big-endian-bigtiff": (
        lambda p: tifffile.imwrite(p, IMG, byteorder=">", bigtiff=True),
        IMG,
    ),
    "uint16-big-endian": (
        lambda p: tifffile.imwrite(p, IMG.astype(np.uint16) * 257, byteorder=">"),
        IMG,
    ),
    "rgb-planar": (
        lambda p: tifffile.imwrite(p, _chw(IMG), photometric="rgb", planarconfig="separate"),
        IMG,
    ),
    "gray": (lambda p: tifffile.imwrite(p, IMG[..., 1].copy()), np.repeat(IMG[..., 1:2], 3, 2)),
    "rgba": (
        lambda p: tifffile.imwrite(
            p, np.dstack([IMG, np.full(IMG.shape[:2], 255, np.uint8)]), extrasamples=["unassalpha"]
        ),
        IMG,
    ),
    "ome-channel-pages-uint16": (
        lambda p: tifffile.imwrite(
            p.with_suffix(".ome.tif"),
            _chw(IMG).astype(np.uint16) * 257,
            photometric="minisblack",
            metadata={"axes": "CYX"},
        ),
        IMG,
    ),
}


@pytest.mark.parametrize("layout", list(RAW_LAYOUTS))
def test_uncompressed_strip_layouts_read_exactly(tmp_path, layout):
    write, expected = RAW_LAYOUTS[layout]
    write(tmp_path / "a.tif")
    (path,) = tmp_path.iterdir()
    rng = np.random.default_rng(3)
    with open_slide(path) as s:
        assert s.backend == "tiff" and s.dimensions == (410, 300)
        assert np.array_equal(s.read_region(0, 0, 0, 410, 300), expected)
        for _ in range(25):
            x, y = (int(v) for v in rng.integers(-60, 420, 2))
            w, h = (int(v) for v in rng.integers(1, 200, 2))
            got = s.read_region(0, x, y, w, h)
            assert np.array_equal(got, _expected_window(expected, x, y, w, h)), (x, y, w, h)


# -- vendor TIFFs OpenSlide cannot open -----------------------------------------------


def _svs_with_tiled_label(path: Path, img: np.ndarray) -> Path:
    """Aperio-like SVS (JPEG level 0, stripped thumbnail, a 4x level, label, macro) whose label
    image is tiled: OpenSlide takes the label for a level and refuses the file ("Downsampled
    images not correctly ordered")."""
    h, w = img.shape[:2]
    desc = (
        f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=70"
        "|AppMag = 40|MPP = 0.25"
    )
    kw = {"compression": "jpeg", "photometric": "rgb", "metadata": None}
    pil = Image.fromarray(img)
    label = np.full((200, 200, 3), (200, 50, 50), np.uint8)
    macro = np.full((300, 800, 3), (50, 200, 50), np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), description=desc, **kw)
        tw.write(np.asarray(pil.resize((w // 8, h // 8))), description="Aperio thumbnail", **kw)
        tw.write(
            np.asarray(pil.resize((w // 4, h // 4), Image.Resampling.BOX)),
            tile=(256, 256),
            description=desc,
            **kw,
        )
        tw.write(
            label,
            tile=(64, 64),
            subfiletype=1,
            description="Aperio label",
            compression="lzw",
            metadata=None,
        )
        tw.write(macro, subfiletype=9, description="Aperio macro", **kw)
    return path


def test_vendor_tiff_openslide_refuses_is_read_by_the_tiff_backend(tmp_path, cli):
    """Without the fallback the image backend took it: level 0 alone, no mpp (and a real
    slide, too large for memory, would be refused)."""
    img = test_image(600, 820, seed=4)
    path = _svs_with_tiled_label(tmp_path / "odd.svs", img)
    with open_slide(path) as s:
        assert s.backend == "tiff"
        assert s.level_dimensions == [(820, 600), (205, 150)]  # not the label, thumbnail, macro
        assert s.mpp == pytest.approx(0.25)
        got = s.read_region(0, 0, 0, 820, 600)
    ref = tifffile.TiffFile(path).pages[0].asarray()
    assert np.array_equal(got, ref)
    proc = cli("info", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    info = json.loads(proc.stdout)
    assert info["backend"] == "tiff" and info["mpp"] == pytest.approx(0.25)
    assert "read with the tiff backend instead" in proc.stderr


# -- OME-Zarr HCS plates ----------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_hcs_plate_names_a_field_image_to_give_instead(tmp_path, cli, zarr_format):
    """A plate (NGFF 0.4 / 0.5) holds images at row/column/field: the error names one, not
    "write it with an NGFF writer" (the plate is valid); the field and the well open."""
    import zarr

    path = tmp_path / "plate.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    plate = {
        "columns": [{"name": "1"}],
        "rows": [{"name": "B"}],
        "wells": [{"path": "B/1", "rowIndex": 0, "columnIndex": 0}],
    }
    well = {"images": [{"path": "3"}]}
    field = root.create_group("B").create_group("1").create_group("3")
    arr = field.create_array("0", shape=(1, 40, 50), dtype="uint8", chunks=(1, 40, 50))
    arr[...] = 90
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "yx"
    ]
    ms = {
        "axes": axes,
        "datasets": [
            {
                "path": "0",
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.65, 0.65]}],
            }
        ],
    }
    if zarr_format == 2:
        root.attrs["plate"] = {**plate, "version": "0.4"}
        root["B/1"].attrs["well"] = {**well, "version": "0.4"}
        field.attrs["multiscales"] = [{**ms, "version": "0.4"}]
    else:
        root.attrs["ome"] = {"version": "0.5", "plate": plate}
        root["B/1"].attrs["ome"] = {"version": "0.5", "well": well}
        field.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    proc = cli("info", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "HCS plate" in lines[0], proc.stderr
    assert str(path / "B" / "1" / "3") in lines[0]
    with open_slide(path / "B" / "1" / "3") as s:
        assert s.dimensions == (50, 40) and s.mpp == pytest.approx(0.65)
        assert (s.read_region(0, 0, 0, 50, 40) == 90).all()


# -- empty files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.svs", "a.ome.tif", "a.tif", "a.png", "a.ome.zarr.zip"])
def test_empty_file_says_it_is_empty(tmp_path, cli, name):
    """An interrupted copy leaves 0-byte files: say so, not "cannot identify image file" or
    "OpenSlide does not recognise this file" (which send users looking at the format)."""
    path = tmp_path / name
    path.write_bytes(b"")
    proc = cli("info", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "empty (0 bytes)" in line and "copy" in line, line


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_level_array_given_as_the_slide_names_the_image_folder(tmp_path, cli, zarr_format):
    """``image.zarr/0`` is level 0's array, not the image: say so and name the folder above,
    not "not a readable zarr group (An array already exists ...)"."""
    import zarr

    image = tmp_path / "image.zarr"
    root = zarr.open_group(str(image), mode="w", zarr_format=zarr_format)
    root.create_array("0", shape=(3, 40, 50), dtype="uint8", chunks=(3, 40, 50))
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}]
    ms = {"axes": axes + [{"name": "x", "type": "space"}], "datasets": [{"path": "0"}]}
    if zarr_format == 2:
        root.attrs["multiscales"] = [{**ms, "version": "0.4"}]
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    proc = cli("info", str(image / "0"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "zarr array (one pyramid level)" in line and f"e.g. {image})" in line, line


# -- float samples ------------------------------------------------------------------------


def _float_zarr(path: Path, levels: list[np.ndarray]) -> Path:
    """OME-Zarr 0.5 (c, y, x) of float (h, w, 3) ``levels``."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for i, lv in enumerate(levels):
        a = _chw(lv)
        z = root.create_array(str(i), shape=a.shape, dtype=a.dtype, chunks=(3, 64, 64))
        z[...] = a
        datasets.append({"path": str(i)})
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space"} for n in "yx"]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    return path


def _float_tiff(path: Path, levels: list[np.ndarray]) -> Path:
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            tw.write(
                lv,
                photometric="rgb",
                tile=(64, 64),
                compression="zlib",
                subfiletype=1 if i else 0,
                metadata=None,
            )
    return path


@pytest.mark.parametrize("kind", ["tiff", "zarr"])
def test_float_samples_of_8bit_values_are_not_white(tmp_path, kind):
    """float32 images holding 0..255 values (numpy/scikit-image pipelines save them so) were
    taken as 0..1 and read back all but white; 0..1 floats keep their mapping."""
    levels = [IMG, IMG[::2, ::2]]
    write = _float_tiff if kind == "tiff" else _float_zarr
    p255 = write(tmp_path / f"f255.{kind}", [lv.astype(np.float32) for lv in levels])
    p1 = write(tmp_path / f"f1.{kind}", [lv.astype(np.float32) / 255 for lv in levels])
    for path in (p255, p1):
        with open_slide(path) as s:
            assert s.backend == kind
            got = s.read_region(0, 0, 0, 410, 300)
        assert np.abs(got.astype(int) - IMG).max() <= 1, path.name


def test_float_intensities_overshooting_1_a_little_stay_0_to_1(tmp_path):
    """0..1 intensities with a few values just above 1 (stain normalisation overshoots) are
    still 0..1, clipped: not taken for 8-bit values (which made them nearly black)."""
    rng = np.random.default_rng(2)
    img = rng.uniform(0.6, 0.98, (300, 410)).astype(np.float32)
    img.ravel()[rng.choice(img.size, img.size // 500, replace=False)] = 1.02  # 0.2 %
    path = tmp_path / "norm.tif"
    tifffile.imwrite(path, img, tile=(64, 64), compression="zlib")
    with open_slide(path) as s:
        got = s.read_region(0, 0, 0, 410, 300)[..., 0].astype(int)
    exp = np.clip(img * 255 + 0.5, 0, 255).astype(int)
    assert np.abs(got - exp).max() <= 1


def test_float_camera_values_span_the_8bit_range(tmp_path):
    """A float image of 12-bit camera values (0..4095, a few hot pixels far above) maps its
    99.9th percentile to white: cells stay visible, not white (0..1) nor black (0..65535)."""
    rng = np.random.default_rng(1)
    cam = rng.uniform(100, 4000, (300, 410)).astype(np.float32)
    cam[:2, :3] = 60000.0  # hot pixels
    cam[5, 5] = np.nan
    path = tmp_path / "cam.tif"
    tifffile.imwrite(path, cam, tile=(64, 64), compression="zlib")
    with open_slide(path) as s:
        got = s.read_region(0, 0, 0, 410, 300)[..., 0].astype(int)
    hi = np.nanpercentile(cam, 99.9)
    exp = np.clip(np.nan_to_num(cam) * (255 / hi) + 0.5, 0, 255).astype(int)
    assert np.abs(got - exp).max() <= 1
    assert 100 < np.median(got) < 160  # mid-grey, as the data are


def test_uncompressed_tiff_cut_after_opening_is_an_error_not_a_crash(tmp_path):
    """Blocks of uncompressed strips are read from the file as they are needed: a file cut
    after opening is a SlideError, not a crash or zeros. Run in a subprocess, so a crash
    fails this test only."""
    import subprocess
    import sys

    path = tmp_path / "raw.tif"
    tifffile.imwrite(path, np.zeros((1100, 1300, 3), np.uint8))  # 3 x 3 blocks of 512 px
    code = f"""
import os
from wsi_mil.errors import SlideError
from wsi_mil.slides import open_slide
s = open_slide({str(path)!r})
s.read_region(0, 0, 0, 10, 10)
os.truncate({str(path)!r}, 2000)
try:
    s.read_region(0, 600, 800, 100, 50)
except SlideError as e:
    print("SlideError", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert "SlideError" in proc.stdout and "shorter than when it was opened" in proc.stdout


def test_openslide_refusing_a_detected_vendor_file_says_so(tmp_path, cli):
    """Forced onto OpenSlide, the same file is not "not recognised as a slide" (OpenSlide
    detects it as Aperio): the message says it cannot open it and that auto also tries the
    tiff backend (which reads Aperio levels right)."""
    path = _svs_with_tiled_label(tmp_path / "odd.svs", test_image(600, 820, seed=4))
    proc = cli("info", str(path), "--backend", "openslide")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "detects the 'aperio' format but cannot open it" in line
    assert "--backend auto then also tries the tiff backend" in line


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_zarr_array_says_it_lacks_ngff_metadata(tmp_path, cli, zarr_format):
    """``zarr.save_array("img.zarr", a)`` writes an array without NGFF metadata: the error
    says that, not "not a readable zarr group (An array already exists ...)"."""
    import zarr

    path = tmp_path / "img.zarr"
    zarr.save_array(str(path), np.zeros((3, 40, 50), np.uint8), zarr_format=zarr_format)
    proc = cli("info", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "plain zarr array, not an OME-Zarr image" in line and "write it as OME-Zarr" in line


@pytest.mark.parametrize("suffix", [".zarr.zip", ".ozx"])
def test_zipped_ome_zarr_with_its_folder_inside(tmp_path, suffix):
    """``zip -r image.zarr.zip image.zarr`` puts the image in a folder of the zip, not at its
    root: it opened as "No group found in store"; it reads like the folder it came from."""
    import os
    import zipfile

    levels = [IMG, IMG[::2, ::2].copy()]
    folder = _float_zarr(tmp_path / "image.zarr", [lv.astype(np.float32) for lv in levels])
    path = tmp_path / f"image{suffix}"
    with zipfile.ZipFile(path, "w") as zf:
        for parent, _, files in os.walk(folder):
            for f in files:
                full = Path(parent) / f
                zf.write(full, full.relative_to(tmp_path).as_posix())  # "image.zarr/..."
    with open_slide(path) as s, open_slide(folder) as ref:
        assert s.backend == "zarr" and s.level_dimensions == ref.level_dimensions
        assert np.array_equal(s.read_region(0, 0, 0, 410, 300), ref.read_region(0, 0, 0, 410, 300))


def test_folder_of_slides_given_as_a_slide_says_how_to_pass_them(tmp_path, cli):
    """A folder of TIFFs is not a slide: the hint says to give a file or a glob, not the
    list of supported formats (which the files in it are)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", IMG)
    proc = cli("info", str(folder))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "give one slide file in it" in line and str(folder / "*.svs") in line, line


# -- mpp --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit, per_unit", [("MICROMETER", 1 / 0.25), ("MILLIMETER", 1000 / 0.25)])
def test_tiff_resolution_in_micrometres_or_millimetres_gives_mpp(tmp_path, unit, per_unit):
    """tifffile writes ResolutionUnit micrometre (5) or millimetre (4) (DNG's units) when asked,
    e.g. ``resolution=(1 / 0.25, 1 / 0.25), resolutionunit="MICROMETER"``: that is 0.25 µm/px,
    not an unknown mpp."""
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, IMG, tile=(64, 64), resolution=(per_unit, per_unit), resolutionunit=unit)
    with open_slide(path) as s:
        assert s.backend == "tiff" and s.mpp == pytest.approx(0.25)
