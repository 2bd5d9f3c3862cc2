"""Tiny test slides written from a numpy RGB image (``from slide_factory import ...``).

Every writer takes an ``(H, W, 3)`` uint8 RGB image as level 0 and builds a pyramid of
2x downsamples (level i is ``max(1, W >> i) x max(1, H >> i)``, box-filtered with Pillow),
so tests can compare any backend's pixels against :func:`pyramid_levels` of the same image.

- :func:`make_pyramidal_tiff`: tiled pyramidal TIFF. Default: levels as successive IFDs,
  which OpenSlide opens as a *generic tiled TIFF*; ``subifds=True`` / ``ome=True`` writes
  the pyramid into SubIFDs of the first page (OME-TIFF style), which OpenSlide cannot
  read as a pyramid but our tifffile backend must.
- :func:`make_ome_zarr`: OME-Zarr (NGFF 0.4 -> zarr v2 store, 0.5 -> zarr v3 store).
- :func:`make_image`: JPEG/PNG/BMP/plain TIFF via Pillow.
- :func:`test_image`: deterministic RGB image with gradients and shapes.

Use ``compression="zlib"`` (lossless) where a test needs exact pixels and ``"jpeg"``
where it tests the JPEG path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = [
    "make_image",
    "make_ome_zarr",
    "make_pyramidal_tiff",
    "pyramid_levels",
    "test_image",
]


def test_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 RGB: colour gradients, a grid of lines, random filled shapes, noise.

    Deterministic for a given (h, w, seed); structured so that an off-by-one in a
    coordinate changes many pixels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 255 * xx / max(w - 1, 1)
    img[..., 1] = 255 * yy / max(h - 1, 1)
    img[..., 2] = 127.5 + 127.5 * np.sin((xx + 2 * yy) / 9.0)
    # thin dark grid lines every 37 px: misregistration shows up immediately
    img[(yy.astype(int) % 37) == 0] = 20
    img[:, (np.arange(w) % 41) == 0] = 235
    n_shapes = max(3, (h * w) // 20000)
    for _ in range(n_shapes):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(4, max(6, min(h, w) / 6))
        colour = rng.integers(0, 256, 3)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r * 0.6)
        img[mask] = colour
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# pytest would otherwise try to collect the helper as a test when imported into a test module
test_image.__test__ = False  # type: ignore[attr-defined]


def pyramid_levels(img: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Level 0 = ``img``; level i = box-downsample of level 0 to ``max(1, W >> i) x max(1, H >> i)``."""
    from PIL import Image

    h, w = img.shape[:2]
    out = [img]
    pil = Image.fromarray(img)
    for i in range(1, n_levels):
        size = (max(1, w >> i), max(1, h >> i))
        out.append(np.asarray(pil.resize(size, Image.Resampling.BOX)))
    return out


def _tiff_compression(compression: str | None) -> tuple[str | None, dict]:
    if compression in (None, "none", "raw"):
        return None, {}
    if compression == "jpeg":
        return "jpeg", {"level": 90}
    if compression in ("zlib", "deflate", "adobe_deflate"):
        return "zlib", {}
    return compression, {}


def make_pyramidal_tiff(
    path: str | Path,
    img: np.ndarray,
    n_levels: int = 3,
    tile_px: int = 256,
    mpp: float | None = 0.5,
    compression: str | None = "jpeg",
    subifds: bool = False,
    ome: bool = False,
    planar: bool = False,
    extra_alpha: bool = False,
    description: str | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF of ``img`` (H, W, 3 uint8 RGB, or H, W grayscale).

    ``mpp`` goes into XResolution/YResolution (pixels per centimetre) and, for OME,
    into PhysicalSizeX/Y in µm. ``compression``: "jpeg" (lossy, quality 90; tifffile
    stores RGB JPEG tiles as YCbCr with 2x2 chroma subsampling, like most scanners),
    "zlib" (lossless) or None. ``planar`` stores RGB as separate planes, ``extra_alpha``
    adds an opaque alpha sample. ``description`` sets level 0's ImageDescription (e.g. an
    Aperio header, so OpenSlide reports vendor "aperio"). Returns the path.
    """
    import tifffile

    path = Path(path)
    ome = bool(ome)
    use_subifds = subifds or ome
    comp, comp_args = _tiff_compression(compression)
    levels = pyramid_levels(img, n_levels)
    gray = img.ndim == 2
    if extra_alpha and not gray:
        levels = [
            np.concatenate([lv, np.full(lv.shape[:2] + (1,), 255, np.uint8)], -1) for lv in levels
        ]
    if planar and not gray:
        levels = [np.ascontiguousarray(np.moveaxis(lv, -1, 0)) for lv in levels]
    kw: dict = {
        "tile": (tile_px, tile_px),
        "compression": comp,
        "compressionargs": comp_args,
        "photometric": "minisblack" if gray else "rgb",
        "planarconfig": "separate" if (planar and not gray) else "contig",
    }
    if extra_alpha and not gray:
        kw["extrasamples"] = ["unassalpha"]
    if mpp is not None:
        ppcm = 1e4 / mpp
        kw["resolution"] = (ppcm, ppcm)
        kw["resolutionunit"] = "CENTIMETER"
    with tifffile.TiffWriter(path, bigtiff=False, ome=ome) as tw:
        if use_subifds:
            md: dict | None = None
            if ome:
                axes = "YX" if gray else ("SYX" if planar else "YXS")
                md = {"axes": axes}
                if mpp is not None:
                    md.update(
                        PhysicalSizeX=mpp,
                        PhysicalSizeY=mpp,
                        PhysicalSizeXUnit="µm",
                        PhysicalSizeYUnit="µm",
                    )
            tw.write(levels[0], subifds=n_levels - 1, metadata=md, description=description, **kw)
            for i in range(1, n_levels):
                sub_kw = dict(kw)
                if mpp is not None:
                    ppcm = 1e4 / (mpp * 2**i)
                    sub_kw["resolution"] = (ppcm, ppcm)
                tw.write(levels[i], subfiletype=1, metadata=None, **sub_kw)
        else:
            for i in range(n_levels):
                lv_kw = dict(kw)
                if mpp is not None and i > 0:
                    ppcm = 1e4 / (mpp * 2**i)
                    lv_kw["resolution"] = (ppcm, ppcm)
                tw.write(
                    levels[i],
                    subfiletype=0 if i == 0 else 1,
                    metadata=None,
                    description=description if i == 0 else None,
                    **lv_kw,
                )
    return path


def make_ome_zarr(
    path: str | Path,
    img: np.ndarray,
    n_levels: int = 3,
    chunk_px: int = 256,
    mpp: float | None = 0.5,
    version: str = "0.4",
    axes: str = "cyx",
) -> Path:
    """Write an OME-Zarr (NGFF multiscales) image of ``img`` (H, W, 3 uint8 RGB).

    ``version="0.4"`` writes a zarr v2 store with ``multiscales`` in ``.zattrs``;
    ``"0.5"`` writes a zarr v3 store with ``{"ome": {"version": "0.5", "multiscales"}}``
    in ``zarr.json``. ``axes``: "cyx" (NGFF-valid), "tczyx" (NGFF-valid, the layout
    bioformats2raw writes) or "yxc" (not NGFF-valid, seen in the wild; our reader accepts
    it). Spatial axes are in micrometers with scale ``mpp * 2**i`` when ``mpp`` is given.
    Returns the path.
    """
    import zarr

    path = Path(path)
    if version not in ("0.4", "0.5"):
        raise ValueError(f"version must be '0.4' or '0.5', got {version!r}")
    zarr_format = 2 if version == "0.4" else 3
    levels = pyramid_levels(img, n_levels)
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    axis_meta = []
    for a in axes:
        if a == "c":
            axis_meta.append({"name": "c", "type": "channel"})
        elif a == "t":
            axis_meta.append({"name": "t", "type": "time"})
        else:
            d = {"name": a, "type": "space"}
            if mpp is not None:
                d["unit"] = "micrometer"
            axis_meta.append(d)
    datasets = []
    for i, lv in enumerate(levels):
        arr = _to_axes(lv, axes)
        chunks = tuple(
            min(chunk_px, s) if a in "yx" else (3 if a == "c" else 1)
            for a, s in zip(axes, arr.shape, strict=True)
        )
        if zarr_format == 2:
            z = root.create_array(str(i), shape=arr.shape, dtype="uint8", chunks=chunks)
        else:
            z = root.create_array(
                str(i),
                shape=arr.shape,
                dtype="uint8",
                chunks=chunks,
                dimension_names=list(axes),
            )
        z[...] = arr
        scale = [
            (float(mpp * 2**i) if mpp is not None else float(2**i)) if a in "yx" else 1.0
            for a in axes
        ]
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    ms = {"axes": axis_meta, "datasets": datasets, "name": path.stem}
    if version == "0.4":
        ms["version"] = "0.4"
        root.attrs["multiscales"] = [ms]
        root.attrs["omero"] = _omero()
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms], "omero": _omero()}
    return path


def _omero() -> dict:
    return json.loads(
        json.dumps(
            {
                "channels": [
                    {
                        "color": c,
                        "label": n,
                        "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                        "active": True,
                    }
                    for c, n in (("FF0000", "R"), ("00FF00", "G"), ("0000FF", "B"))
                ],
                "rdefs": {"model": "color"},
            }
        )
    )


def _to_axes(lv: np.ndarray, axes: str) -> np.ndarray:
    if axes == "yxc":
        return lv
    if axes == "cyx":
        return np.ascontiguousarray(np.moveaxis(lv, -1, 0))
    if axes == "tczyx":
        return np.ascontiguousarray(np.moveaxis(lv, -1, 0))[None, :, None]
    raise ValueError(f"axes must be 'cyx', 'yxc' or 'tczyx', got {axes!r}")


def make_image(path: str | Path, img: np.ndarray, quality: int = 95) -> Path:
    """Write ``img`` with Pillow; the format follows the suffix (.jpg/.png/.bmp/.tif).

    A ``.tif`` is a plain (strip, non-pyramidal) TIFF. Returns the path.
    """
    from PIL import Image

    path = Path(path)
    kw = {"quality": quality} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(img).save(path, **kw)
    return path
