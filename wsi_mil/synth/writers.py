"""Streamed writers: pyramidal JPEG-tiled TIFF, OME-Zarr (NGFF 0.4/0.5), JPEG/PNG.

Tiles are rendered in a small thread pool (numpy and BLAS release the GIL) and handed
to the writer in order; at most ``2 * workers + 2`` tiles are in flight, so memory is
bounded whatever the slide size. Every level is rendered from the slide spec at its
own resolution (see render.py), so no level is ever held or re-read.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wsi_mil import __version__
from wsi_mil.synth.render import SlideSpec, render_region

Progress = Callable[[int], None]  # called with the number of tiles just finished


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run BLAS single-threaded inside: tiles are already rendered in parallel, and
    OpenBLAS threads on tiny matrix products only fight those threads for the cores."""
    lib = _openblas()
    if lib is None:
        yield
        return
    before = lib.get()
    lib.set(1)
    try:
        yield
    finally:
        lib.set(before)


@functools.cache
def _openblas():  # noqa: ANN202
    """numpy's bundled OpenBLAS thread controls, or None (other BLAS builds: left alone)."""
    import ctypes
    from types import SimpleNamespace

    libdir = Path(np.__file__).parent.parent / "numpy.libs"
    for so in sorted(libdir.glob("libscipy_openblas*.so*")) if libdir.is_dir() else []:
        try:
            lib = ctypes.CDLL(str(so))
            for suffix in ("64_", "_64_", ""):
                get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
                if get and set_:
                    set_.argtypes = [ctypes.c_int]
                    return SimpleNamespace(get=get, set=set_)
        except OSError:
            continue
    return None


def level_shapes(width_px: int, height_px: int, tile_px: int) -> list[tuple[int, int, int]]:
    """[(downsample, width, height)] for levels halving until the level fits one tile."""
    out = [(1, width_px, height_px)]
    while max(out[-1][1], out[-1][2]) > tile_px:
        d = out[-1][0] * 2
        out.append((d, math.ceil(width_px / d), math.ceil(height_px / d)))
    return out


def count_tiles(width_px: int, height_px: int, tile_px: int) -> int:
    """Tiles over all levels (for progress bars)."""
    return sum(
        math.ceil(w / tile_px) * math.ceil(h / tile_px)
        for _, w, h in level_shapes(width_px, height_px, tile_px)
    )


def _tile(spec: SlideSpec, d: int, lw: int, lh: int, tx: int, ty: int, t: int) -> np.ndarray:
    """(t, t, 3) tile at level coords (tx, ty); the part beyond the level edge is white."""
    w, h = min(t, lw - tx), min(t, lh - ty)
    img = render_region(spec, tx * d, ty * d, w, h, d)
    if (w, h) == (t, t):
        return img
    out = np.full((t, t, 3), 255, np.uint8)
    out[:h, :w] = img
    return out


def iter_tiles(
    spec: SlideSpec,
    d: int,
    lw: int,
    lh: int,
    t: int,
    pool: ThreadPoolExecutor,
    workers: int,
    progress: Progress | None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(tx, ty, tile) of one level in row-major order, rendered ahead by ``pool``."""
    coords = ((tx, ty) for ty in range(0, lh, t) for tx in range(0, lw, t))
    pending: deque = deque()
    ahead = 2 * workers + 2
    for tx, ty in coords:
        pending.append((tx, ty, pool.submit(_tile, spec, d, lw, lh, tx, ty, t)))
        if len(pending) >= ahead:
            x, y, f = pending.popleft()
            yield x, y, f.result()
            if progress:
                progress(1)
    while pending:
        x, y, f = pending.popleft()
        yield x, y, f.result()
        if progress:
            progress(1)


def write_tiff(
    spec: SlideSpec,
    path: Path,
    *,
    mpp: float,
    tile_px: int,
    jpeg_quality: int,
    workers: int,
    progress: Progress | None = None,
) -> None:
    """JPEG-tiled pyramidal TIFF (one IFD per level) that OpenSlide opens as generic-tiff.

    Resolution tags are pixels per centimetre (OpenSlide turns them into
    ``openslide.mpp-x/y``). BigTIFF when the raw size is over 2 GB.
    """
    import tifffile

    bigtiff = spec.width_px * spec.height_px * 3 > 2**31
    desc = f"wsi-mil {__version__} synthetic slide {spec.slide_id}; mpp={mpp}"
    with ThreadPoolExecutor(workers) as pool, tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for k, (d, lw, lh) in enumerate(level_shapes(spec.width_px, spec.height_px, tile_px)):
            tiles = (
                tile for _, _, tile in iter_tiles(spec, d, lw, lh, tile_px, pool, workers, progress)
            )
            px_per_cm = 1e4 / (mpp * d)
            tw.write(
                tiles,
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile_px, tile_px),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                description=desc if k == 0 else None,
                metadata=None,
                software=False,
                maxworkers=workers,
            )


def ngff_metadata(name: str, mpp: float, downsamples: list[int], zarr_format: int) -> dict:
    """Group attributes for NGFF multiscales: 0.5 (zarr v3, under "ome") or 0.4 (zarr v2)."""
    version = "0.5" if zarr_format == 3 else "0.4"
    ms = {
        "name": name,
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ],
        "datasets": [
            {
                "path": str(k),
                "coordinateTransformations": [{"type": "scale", "scale": [1.0, mpp * d, mpp * d]}],
            }
            for k, d in enumerate(downsamples)
        ],
        "type": "mean",
    }
    omero = {
        "channels": [
            {
                "label": lab,
                "color": col,
                "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                "active": True,
            }
            for lab, col in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
        ],
        "rdefs": {"model": "color"},
    }
    if zarr_format == 3:
        return {"ome": {"version": version, "multiscales": [ms], "omero": omero}}
    ms["version"] = version
    omero["version"] = version
    return {"multiscales": [ms], "omero": omero}


def write_ome_zarr(
    spec: SlideSpec,
    path: Path,
    *,
    mpp: float,
    tile_px: int,
    zarr_format: int,
    workers: int,
    progress: Progress | None = None,
) -> None:
    """OME-Zarr image: arrays ``0``, ``1``, ... of shape (3, y, x) uint8, chunks (3, t, t)."""
    import zarr

    levels = level_shapes(spec.width_px, spec.height_px, tile_px)
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    with ThreadPoolExecutor(workers) as pool:
        for k, (d, lw, lh) in enumerate(levels):
            arr = root.create_array(
                str(k),
                shape=(3, lh, lw),
                chunks=(3, tile_px, tile_px),
                dtype="uint8",
                fill_value=255,
                **({"dimension_names": ["c", "y", "x"]} if zarr_format == 3 else {}),
            )
            for tx, ty, tile in iter_tiles(spec, d, lw, lh, tile_px, pool, workers, progress):
                w, h = min(tile_px, lw - tx), min(tile_px, lh - ty)
                arr[:, ty : ty + h, tx : tx + w] = tile[:h, :w].transpose(2, 0, 1)
    root.update_attributes(
        ngff_metadata(spec.slide_id, mpp, [d for d, _, _ in levels], zarr_format)
    )


def write_image(
    spec: SlideSpec,
    path: Path,
    *,
    fmt: str,
    mpp: float,
    jpeg_quality: int,
    tile_px: int,
    workers: int,
    progress: Progress | None = None,
) -> None:
    """Single-level JPEG or PNG (small slides only: the image is assembled in memory)."""
    from PIL import Image

    img = np.empty((spec.height_px, spec.width_px, 3), np.uint8)
    with ThreadPoolExecutor(workers) as pool:
        for tx, ty, tile in iter_tiles(
            spec, 1, spec.width_px, spec.height_px, tile_px, pool, workers, progress
        ):
            h, w = img[ty : ty + tile_px, tx : tx + tile_px].shape[:2]
            img[ty : ty + h, tx : tx + w] = tile[:h, :w]
    dpi = 25_400.0 / mpp
    kw: dict = {"dpi": (dpi, dpi)} if dpi <= 65_535 else {}
    if fmt == "jpeg":
        Image.fromarray(img).save(path, format="JPEG", quality=jpeg_quality, **kw)
    else:
        Image.fromarray(img).save(path, format="PNG", compress_level=3, **kw)
