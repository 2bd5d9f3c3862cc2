"""Slides and images of many kinds the other tests do not write, through the real CLI.

Pathology (OME-TIFF / generic TIFF pyramids of every common tile codec and layout, an
Aperio-like SVS with non-integer downsamples) and cell imaging (multi-channel uint16
OME-TIFF and OME-Zarr, z-stacks and time series, 12-bit camera data, plain PNG/JPEG).
For each: ``wsi-mil info`` works, ``wsi-mil tile`` stores exactly what
``Slide.read_region`` returns for every patch (edge patches included), and where the
input is lossless ``read_region`` returns the source pixels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_factory import pyramid_levels, test_image

from wsi_mil.slides import open_slide
from wsi_mil.tiling import PatchStore

PATCH = 64


def _gray3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def _subifd_tiff(
    path: Path,
    levels: list[np.ndarray],
    *,
    ome: bool = True,
    bigtiff: bool = False,
    metadata: dict | None = None,
    **kw,
) -> Path:
    """A SubIFD pyramid (OME-TIFF style) of ``levels``; ``kw`` goes to every ``write``."""
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **kw)
    return path


def _write_zarr(
    path: Path,
    arrays: list[np.ndarray],
    axes: str,
    *,
    zarr_format: int = 3,
    chunks: tuple[int, ...] | None = None,
    shards: tuple[int, ...] | None = None,
    transforms: bool = True,
    mpp: float | None = 0.5,
) -> Path:
    """An OME-Zarr multiscale image (NGFF 0.5 on zarr v3, 0.4 on zarr v2) of ``arrays``."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    datasets = []
    for i, a in enumerate(arrays):
        ch = chunks or tuple(48 if ax in "yx" else 1 for ax in axes)
        ch = tuple(min(c, s) for c, s in zip(ch, a.shape, strict=True))
        kw: dict = {"dimension_names": list(axes)} if zarr_format == 3 else {}
        if shards is not None:
            kw["shards"] = tuple(max(s, c) for s, c in zip(shards, ch, strict=True))
        z = root.create_array(str(i), shape=a.shape, dtype=a.dtype, chunks=ch, **kw)
        z[...] = a
        ds: dict = {"path": str(i)}
        if transforms:
            scale = [(mpp or 1.0) * 2**i if ax in "yx" else 1.0 for ax in axes]
            ds["coordinateTransformations"] = [{"type": "scale", "scale": scale}]
        datasets.append(ds)
    axis_meta = [
        {
            "name": ax,
            "type": {"c": "channel", "t": "time"}.get(ax, "space"),
            **({"unit": "micrometer"} if ax in "zyx" and mpp else {}),
        }
        for ax in axes
    ]
    ms = {"axes": axis_meta, "datasets": datasets, "name": path.stem}
    if zarr_format == 2:
        root.attrs["multiscales"] = [{**ms, "version": "0.4"}]
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return path


def _aperio_svs(path: Path, img: np.ndarray, sizes: list[tuple[int, int]]) -> Path:
    """Aperio-like SVS: JPEG-tiled level 0, a stripped thumbnail, reduced levels of ``sizes``
    (non-integer downsamples, as real scanners write)."""
    h, w = img.shape[:2]
    desc = (
        f"Aperio Image Library v10.0.50\r\n{w}x{h} [0,100 {w}x{h}] (256x256) JPEG/RGB Q=70"
        "|AppMag = 20|MPP = 0.499"
    )
    kw = {"compression": "jpeg", "photometric": "rgb", "metadata": None}
    pil = Image.fromarray(img)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), description=desc, **kw)
        thumb = np.asarray(pil.resize((w // 8, h // 8)))
        tw.write(thumb, description="Aperio Image Library v10.0.50\r\nthumbnail", **kw)
        for size in sizes:
            lv = np.asarray(pil.resize(size, Image.Resampling.BOX))
            tw.write(lv, tile=(256, 256), description=desc, **kw)
    return path


# name -> writer(folder) returning (path, expected level-0 RGB or None when lossy/undefined)
Case = Callable[[Path], tuple[Path, np.ndarray | None]]
IMG = test_image(150, 205, seed=11)  # 205 x 150: no size is a multiple of a tile or patch
LEVELS = pyramid_levels(IMG, 3)
RNG = np.random.default_rng(5)
FLUO = (RNG.random((4, 150, 205)) * 65535).astype(np.uint16)  # 4-channel 16-bit CYX


def _rgba() -> tuple[np.ndarray, np.ndarray]:
    a = np.dstack([IMG, np.full(IMG.shape[:2], 255, np.uint8)])
    a[:30, :40, 3] = 0  # transparent corner: white
    exp = IMG.copy()
    exp[:30, :40] = 255
    return a, exp


CASES: dict[str, Case] = {
    "ome-lzw-128": lambda d: (
        _subifd_tiff(d / "a.ome.tif", LEVELS, tile=(128, 128), compression="lzw", predictor=True),
        IMG,
    ),
    "ome-zstd-240": lambda d: (
        _subifd_tiff(d / "a.ome.tif", LEVELS, tile=(240, 240), compression="zstd"),
        IMG,
    ),
    "bigtiff-raw-256x128": lambda d: (
        _subifd_tiff(d / "a.ome.tif", LEVELS, tile=(128, 256), bigtiff=True),
        IMG,
    ),
    "ome-planar-rgb": lambda d: (
        _subifd_tiff(
            d / "a.ome.tif",
            [np.ascontiguousarray(np.moveaxis(lv, -1, 0)) for lv in LEVELS],
            tile=(64, 64),
            compression="zlib",
            photometric="rgb",
            planarconfig="separate",
            metadata={"axes": "SYX"},
        ),
        IMG,
    ),
    "ome-uint16-rgb": lambda d: (
        _subifd_tiff(
            d / "a.ome.tif",
            [lv.astype(np.uint16) * 257 for lv in LEVELS],
            tile=(128, 128),
            compression="zlib",
        ),
        IMG,
    ),
    "ome-gray8": lambda d: (
        _subifd_tiff(
            d / "a.ome.tif",
            [lv[..., 1] for lv in LEVELS],
            tile=(128, 128),
            compression="zlib",
            photometric="minisblack",
        ),
        _gray3(IMG[..., 1]),
    ),
    "ome-rgba": lambda d: (
        _subifd_tiff(d / "a.ome.tif", [_rgba()[0]], tile=(64, 64), extrasamples=["unassalpha"]),
        _rgba()[1],
    ),
    "ome-jpeg-tiles": lambda d: (
        _subifd_tiff(d / "a.ome.tif", LEVELS, tile=(128, 128), compression="jpeg"),
        None,
    ),
    "tiff-tiles-16px": lambda d: (
        _write(lambda p: tifffile.imwrite(p, IMG, tile=(16, 32), compression="zlib"), d / "a.tif"),
        IMG,
    ),
    "tiff-strips": lambda d: (
        _write(
            lambda p: tifffile.imwrite(p, IMG, rowsperstrip=17, compression="zlib"), d / "a.tif"
        ),
        IMG,
    ),
    "tiff-planar-strips": lambda d: (
        _write(
            lambda p: tifffile.imwrite(
                p,
                np.ascontiguousarray(np.moveaxis(IMG, -1, 0)),
                photometric="rgb",
                planarconfig="separate",
                rowsperstrip=7,
            ),
            d / "a.tif",
        ),
        IMG,
    ),
    "tiff-palette": lambda d: _palette_tiff(d / "a.tif"),
    "tiff-1px-wide": lambda d: (
        _write(lambda p: tifffile.imwrite(p, IMG[:, :1].copy(), tile=(16, 16)), d / "a.tif"),
        IMG[:, :1],
    ),
    "ome-fluo-4c-uint16": lambda d: (
        _subifd_tiff(
            d / "a.ome.tif",
            [FLUO, FLUO[:, ::2, ::2].copy()],
            tile=(64, 64),
            compression="zlib",
            photometric="minisblack",
            metadata={"axes": "CYX"},
        ),
        np.moveaxis((FLUO[:3] >> 8).astype(np.uint8), 0, -1),
    ),
    "svs-aperio-jpeg": lambda d: (
        _aperio_svs(d / "a.svs", test_image(301, 413, seed=3), [(103, 75)]),
        None,
    ),
    "zarr-v05-yxc": lambda d: (_write_zarr(d / "a.zarr", LEVELS, "yxc"), IMG),
    "zarr-v04-cyx": lambda d: (
        _write_zarr(
            d / "a.zarr", [np.moveaxis(lv, -1, 0).copy() for lv in LEVELS], "cyx", zarr_format=2
        ),
        IMG,
    ),
    "zarr-tczyx-uint16": lambda d: (
        _write_zarr(d / "a.zarr", [FLUO[None, :, None], FLUO[None, :, None, ::2, ::2]], "tczyx"),
        np.moveaxis((FLUO[:3] >> 8).astype(np.uint8), 0, -1),
    ),
    "zarr-single-no-transforms": lambda d: (
        _write_zarr(d / "a.zarr", [IMG], "yxc", transforms=False, mpp=None),
        IMG,
    ),
    "zarr-sharded-gray": lambda d: (
        _write_zarr(d / "a.zarr", [IMG[..., 2].copy()], "yx", chunks=(32, 32), shards=(96, 96)),
        _gray3(IMG[..., 2]),
    ),
    "png-gray": lambda d: (_pil(d / "a.png", Image.fromarray(IMG[..., 0])), _gray3(IMG[..., 0])),
    "png-rgba": lambda d: (_pil(d / "a.png", Image.fromarray(_rgba()[0])), _rgba()[1]),
    "png-16bit-gray": lambda d: (
        _pil(d / "a.png", Image.fromarray(IMG[..., 1].astype(np.uint16) * 257)),
        _gray3(IMG[..., 1]),
    ),
    "png-smaller-than-patch": lambda d: (
        _pil(d / "a.png", Image.fromarray(IMG[:20, :30])),
        IMG[:20, :30],
    ),
    "jpeg-rgb": lambda d: (_pil(d / "a.jpg", Image.fromarray(IMG)), None),
}


def _write(fn: Callable[[Path], object], path: Path) -> Path:
    fn(path)
    return path


def _pil(path: Path, im: Image.Image) -> Path:
    im.save(path)
    return path


def _palette_tiff(path: Path) -> tuple[Path, np.ndarray]:
    p = Image.fromarray(IMG).quantize(16)
    pal = np.array(p.getpalette()[:48], np.uint16).reshape(16, 3) * 257
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :16] = pal.T
    tifffile.imwrite(path, np.asarray(p), photometric="palette", colormap=cmap, tile=(64, 64))
    return path, np.asarray(p.convert("RGB"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray | None]]:
    root = tmp_path_factory.mktemp("generality")
    out = {}
    for name, make in CASES.items():
        d = root / name
        d.mkdir()
        out[name] = make(d)
    return out


def _prop(path: Path, name: str):
    with open_slide(path) as s:
        return getattr(s, name)


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_info_and_read_region_match_source(generated, cli):
    """``wsi-mil info`` on every input exits 0; lossless inputs read back their source pixels."""
    wrong = []
    for name, (path, expected) in generated.items():
        proc = cli("info", str(path), "--json")
        _no_traceback(proc)
        assert proc.returncode == 0, (name, proc.stderr)
        info = json.loads(proc.stdout)
        with open_slide(path) as s:
            assert list(s.dimensions) == info["level_dimensions"][0], name
            if expected is None:
                continue
            h, w = expected.shape[:2]
            assert s.dimensions == (w, h), name
            for level in range(s.level_count):  # every level is readable, edges included
                lw, lh = s.level_dimensions[level]
                assert s.read_level_region(level, lw - 5, lh - 5, 9, 9)[5:, 5:].min() == 255
            if not np.array_equal(s.read_region(0, 0, 0, w, h), expected):
                wrong.append(name)
    assert not wrong, f"read_region differs from the source image: {wrong}"


def _tile(cli, generated, work: Path, *args: str) -> None:
    csv = work / "slides.csv"
    work.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path"] + [f"{n},{p}" for n, (p, _) in generated.items()]
    csv.write_text("\n".join(rows) + "\n")
    proc = cli("tile", "--slides", str(csv), "--work", str(work), "--workers", "2", *args)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _store_vs_read_region(work: Path, names, min_patches: int = 1) -> list[str]:
    bad = []
    for name in names:
        st = PatchStore.open(work / "patches" / f"{name}.zarr")
        assert len(st) >= min_patches, name
        if not len(st):
            continue
        px = st.pixels(0, len(st))
        assert px.shape[1:] == (st.patch_size, st.patch_size, 3) and px.dtype == np.uint8
        p_level = st.patch_size_level
        with open_slide(st.slide_path) as s:
            for i, (x, y) in enumerate(st.coords):
                ref = s.read_region(st.level, int(x), int(y), p_level, p_level)
                if p_level != st.patch_size:
                    from wsi_mil.tiling.read import resize_rgb

                    ref = resize_rgb(ref, st.patch_size)
                if not np.array_equal(ref, px[i]):
                    bad.append(f"{name}[{i}] at {(int(x), int(y))}")
                    break
    return bad


def test_tile_every_input_stores_read_region_pixels(generated, cli, tmp_path):
    """``--tissue none``: every grid patch of every input, right/bottom edge patches padded
    white, equals ``read_region`` of the same coordinates."""
    work = tmp_path / "w"
    _tile(cli, generated, work, "--tissue", "none", "--patch-size", str(PATCH))
    for name, (path, _) in generated.items():
        with open_slide(path) as s:
            w, h = s.dimensions
        st = PatchStore.open(work / "patches" / f"{name}.zarr")
        assert len(st) == -(-w // PATCH) * -(-h // PATCH), name
    assert not _store_vs_read_region(work, generated)


def test_tile_default_tissue_and_level_one(generated, cli, tmp_path):
    """Default tissue detection never crashes and its stores hold ``read_region`` pixels;
    ``--level 1`` on the pyramids (non-integer downsample on the SVS) likewise."""
    work = tmp_path / "otsu"
    _tile(cli, generated, work, "--patch-size", "48")
    assert not _store_vs_read_region(work, generated, min_patches=0)
    pyramids = {n: v for n, v in generated.items() if _prop(v[0], "level_count") > 1}
    assert {"svs-aperio-jpeg", "ome-lzw-128", "zarr-v05-yxc"} <= set(pyramids)
    work = tmp_path / "l1"
    _tile(cli, pyramids, work, "--tissue", "none", "--level", "1", "--patch-size", "32")
    assert not _store_vs_read_region(work, pyramids)


def test_tile_mpp_between_levels(generated, cli, tmp_path):
    """``--mpp`` on slides with mpp metadata: a level is picked (or read finer and resized)."""
    with_mpp = {n: v for n, v in generated.items() if _prop(v[0], "mpp") is not None}
    assert {"svs-aperio-jpeg", "zarr-v05-yxc", "zarr-tczyx-uint16"} <= set(with_mpp)
    work = tmp_path / "mpp"
    _tile(cli, with_mpp, work, "--tissue", "none", "--mpp", "0.75", "--patch-size", "32")
    assert not _store_vs_read_region(work, with_mpp)
    st = PatchStore.open(work / "patches" / "zarr-v05-yxc.zarr")
    assert (st.level, st.patch_size_level) == (0, 48)  # 0.5 mpp read at 48 px, resized to 32


# -- cell imaging: channels as pages -------------------------------------------------


@pytest.mark.parametrize("axes", ["TCZYX", "CZYX", "ZCYX"])
def test_ome_tiff_channels_come_from_first_plane(tmp_path, axes):
    """Channels stored as pages among z-planes / time points: RGB is channels 0, 1, 2 of
    t = 0, z = 0, not the first three pages (which are z-planes for DimensionOrder XYZCT)."""
    sizes = {"T": 2, "C": 3, "Z": 4, "Y": 40, "X": 50}
    data = RNG.integers(0, 65535, [sizes[a] for a in axes], dtype=np.uint16)
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(
        path, data, tile=(32, 32), photometric="minisblack", metadata={"axes": axes}, ome=True
    )
    first = data[tuple(slice(None) if a in "CYX" else 0 for a in axes)]  # (C, Y, X) at t0, z0
    expected = np.moveaxis((first >> 8).astype(np.uint8), 0, -1)
    with open_slide(path) as s:
        assert s.backend == "tiff"
        assert np.array_equal(s.read_region(0, 0, 0, 50, 40), expected)


@pytest.mark.parametrize("bits", [12, 10, 8])
def test_ome_significant_bits_scale_camera_data(tmp_path, bits):
    """12-bit (or 10-, 8-bit) camera data stored as uint16 with OME SignificantBits uses its
    top 8 significant bits, not the top 8 of 16 (which would leave the image nearly black)."""
    data = RNG.integers(0, 2**bits, (3, 90, 110), dtype=np.uint16)
    path = tmp_path / "cam.ome.tif"
    tifffile.imwrite(
        path,
        data,
        tile=(64, 64),
        photometric="minisblack",
        metadata={"axes": "CYX", "SignificantBits": bits},
        ome=True,
    )
    with open_slide(path) as s:
        got = s.read_region(0, 0, 0, 110, 90)
    assert np.array_equal(got, np.moveaxis((data >> (bits - 8)).astype(np.uint8), 0, -1))
    # without the attribute the documented rule stands: the top 8 of 16 bits
    plain = tmp_path / "plain.ome.tif"
    tifffile.imwrite(
        plain, data, tile=(64, 64), photometric="minisblack", metadata={"axes": "CYX"}, ome=True
    )
    with open_slide(plain) as s:
        assert s.read_region(0, 0, 0, 110, 90).max() == (2**bits - 1) >> 8


@pytest.mark.parametrize("unit", ["micron", "um", "\\u00B5m", "nm"])
def test_imagej_tiff_calibration_gives_mpp(tmp_path, unit):
    """Fiji/ImageJ TIFFs store px per ``unit`` (from the description) with ResolutionUnit
    "none": that is the slide's mpp, so ``--mpp`` works on them."""
    path = tmp_path / "fiji.tif"
    px_per_unit = 1 / 325.0 if unit == "nm" else 1 / 0.325
    data = RNG.integers(0, 4096, (3, 40, 50), dtype=np.uint16)
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(px_per_unit, px_per_unit),
        metadata={"unit": unit, "axes": "CYX"},
    )
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.325)
        # channels as pages: channels 0-2 as RGB
        expected = np.moveaxis((data >> 8).astype(np.uint8), 0, -1)
        assert np.array_equal(s.read_region(0, 0, 0, 50, 40), expected)


def test_imagej_tiff_without_unit_has_no_mpp(tmp_path):
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(path, IMG, imagej=True, resolution=(2.0, 2.0), metadata={"axes": "YXS"})
    with open_slide(path) as s:
        assert s.mpp is None


def _ome_pyramid(tw: tifffile.TiffWriter, img: np.ndarray, name: str) -> None:
    kw = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib"}
    meta = {"axes": "YXS", "Name": name, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    tw.write(img, subifds=1, metadata=meta, **kw)
    tw.write(img[::2, ::2].copy(), subfiletype=1, **kw)


@pytest.mark.parametrize("name", ["Label-free 20x", "Overview scan", "HE thumbnail-free"])
def test_ome_tiff_slide_named_like_an_associated_image_keeps_its_pyramid(tmp_path, name):
    """Any name containing label/macro/thumbnail/overview used to be skipped: the only image
    then opened without its SubIFD pyramid and mpp (or not at all)."""
    img = test_image(256, 384, seed=2)
    p = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        _ome_pyramid(tw, img, name)
    with open_slide(p) as s:
        assert (s.backend, s.level_dimensions, s.mpp) == ("tiff", [(384, 256), (192, 128)], 0.5)


def test_ome_tiff_label_image_is_not_the_slide_even_when_larger(tmp_path):
    img, label = test_image(128, 192, seed=2), test_image(300, 300, seed=3)
    p = tmp_path / "s.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        _ome_pyramid(tw, img, "HE 20x")
        _ome_pyramid(tw, label, "label image")
    with open_slide(p) as s:
        assert s.level_dimensions[0] == (192, 128)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 192, 128), img)


@pytest.mark.parametrize("factors", [(1, 8, 64), (1, 4, 16, 32), (1, 5, 25)])
def test_tiff_pyramid_with_uneven_steps_keeps_every_level(tmp_path, factors):
    """tifffile's pyramid takes steps of 2, 3 or 4, the same each time; the other levels were
    dropped (OpenSlide saw them), so --level failed and --mpp resized level 0. A stripped
    page of the same aspect (an SVS-style thumbnail) is not a level, as in OpenSlide."""
    img = test_image(1280, 1920, seed=4)
    p = tmp_path / "p.tif"
    kw = {"compression": "zlib", "photometric": "rgb"}
    with tifffile.TiffWriter(p) as tw:
        for i, f in enumerate(factors):
            lv = np.asarray(Image.fromarray(img).reduce(f))
            tw.write(lv, tile=(64, 64), subfiletype=0 if i == 0 else 1, **kw)
            if i == 0:
                tw.write(np.asarray(Image.fromarray(img).reduce(10)), rowsperstrip=16, **kw)
    with open_slide(p, backend="tiff") as ours, open_slide(p, backend="openslide") as ref:
        assert ours.level_dimensions == ref.level_dimensions
        assert len(ours.level_dimensions) == len(factors)
        top = len(factors) - 1
        w, h = ours.level_dimensions[top]
        np.testing.assert_array_equal(
            ours.read_region(top, 0, 0, w, h), ref.read_region(top, 0, 0, w, h)
        )
