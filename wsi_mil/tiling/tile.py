"""`wsi-mil tile`: slide -> tissue mask -> patch grid -> zarr patch store (+ pixels).

Per slide (:func:`tile_slide`): take the output lock, skip if the store is complete and
was built from the same file (fingerprint) with the same parameters (digest), otherwise
compute the tissue mask on a thumbnail, lay the grid at the chosen level, keep patches
with enough tissue, write a QC PNG, and write the store under a temporary name (pixels
read tile-aligned, see :mod:`wsi_mil.tiling.read`), renamed into place when complete.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import queue
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.batch import (
    BatchResult,
    Busy,
    Skip,
    SlideWarning,
    atomic_path,
    available_cpus,
    file_fingerprint,
    make_output_dir,
    output_lock,
    params_digest,
    pool_workers,
    remove_stale_tmps,
    run_per_slide,
    shard_items,
)
from wsi_mil.config import TileConfig, save_resolved
from wsi_mil.errors import ConfigError, SlideError, StoreError
from wsi_mil.slides.base import thumbnail_size
from wsi_mil.tiling.grid import LevelChoice, choose_level, grid_level_xy, level_to_level0_xy
from wsi_mil.tiling.patch_store import (
    COMPRESSIONS,
    PatchStore,
    PatchStoreWriter,
    aligned_empty,
)
from wsi_mil.tiling.qc import QC_MAX_PX, qc_image
from wsi_mil.tiling.read import iter_patch_chunks
from wsi_mil.tiling.tissue import (
    TISSUE_METHODS,
    inside_fraction,
    patch_tissue_fraction,
    pen_colours,
    tissue_mask,
)

log = logging.getLogger(__name__)

#: bump when a change in the algorithm changes the stores for the same parameters
TILING_VERSION = 1
#: version of the tissue scores (2: grey and dark-background images, see tissue.py); an
#: empty otsu store of an older version is not current (it may be a grey image it missed)
TISSUE_SCORES = 2
#: largest enlargement of patches asked for at an --mpp finer than level 0's
MAX_UPSAMPLE = 8
#: largest window read for one patch (before it is shrunk) that may exceed the whole slide
MAX_WINDOW_BYTES = 1 << 30
#: patches per zarr chunk of ``pixels`` (each written as one file, in parallel)
CHUNK_PATCHES = 64
#: raw bytes of one chunk of ``pixels`` at most: fewer patches per chunk for large patches
#: (a chunk is one file, and a few are held in memory while tiling; 64 patches of 12,000 px
#: would be 27 GB). Patches up to 295 px keep CHUNK_PATCHES.
CHUNK_BYTES = 16 << 20


def round_down(x: float, digits: int = 3) -> float:
    """``x`` > 0 rounded down to ``digits`` significant digits (a bound that still holds)."""
    step = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return math.floor(x / step) * step


def chunk_patches(patch_px: int) -> int:
    """Patches per zarr chunk of ``pixels`` for output patches ``patch_px`` a side."""
    return max(1, min(CHUNK_PATCHES, CHUNK_BYTES // (3 * patch_px * patch_px)))


def patches_dir(work: str | Path) -> Path:
    """``W/patches``: where patch stores (and CLAM .h5 coords) go."""
    return Path(work) / "patches"


def masks_dir(work: str | Path) -> Path:
    """``W/masks``: QC PNGs of tissue mask + kept patches."""
    return Path(work) / "masks"


def validate_config(cfg: TileConfig) -> None:
    """Raise ConfigError for option values that can never work (before touching any slide)."""
    if cfg.patch_size < 1:
        raise ConfigError(f"--patch-size must be >= 1, got {cfg.patch_size}")
    if cfg.stride is not None and cfg.stride < 1:
        raise ConfigError(f"--stride must be >= 1, got {cfg.stride}")
    if cfg.level is not None and cfg.mpp is not None:
        raise ConfigError("--level and --mpp are exclusive", "give one of them")
    if cfg.level is not None and cfg.level < 0:
        raise ConfigError(f"--level must be >= 0, got {cfg.level}")
    for name, v in (("--mpp", cfg.mpp), ("--slide-mpp", cfg.slide_mpp)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a number > 0, got {v}", "e.g. 0.5 (20x)")
    if not (math.isfinite(cfg.mpp_tolerance) and cfg.mpp_tolerance >= 0):
        raise ConfigError(
            f"--mpp-tolerance must be a number >= 0, got {cfg.mpp_tolerance}",
            "e.g. 0.1: a level within 10 % of --mpp is read as it is",
        )
    if cfg.significant_bits is not None and not 8 <= cfg.significant_bits <= 32:
        raise ConfigError(
            f"--significant-bits must be 8..32, got {cfg.significant_bits}",
            "e.g. 12 for 12-bit camera data stored in uint16",
        )
    if cfg.tissue not in TISSUE_METHODS:
        raise ConfigError(
            f"--tissue {cfg.tissue!r} is unknown", f"choose one of {', '.join(TISSUE_METHODS)}"
        )
    pen_colours(cfg.exclude_pen)  # unknown ink colours: a ConfigError before the batch
    if not 0.0 <= cfg.min_tissue <= 1.0:
        raise ConfigError(f"--min-tissue must be in [0, 1], got {cfg.min_tissue}")
    if cfg.compression not in COMPRESSIONS:
        raise ConfigError(
            f"--compression {cfg.compression!r} is unknown",
            f"choose one of {', '.join(COMPRESSIONS)}",
        )
    if cfg.thumbnail_px < 64:
        raise ConfigError(f"--thumbnail-px must be >= 64, got {cfg.thumbnail_px}")
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {cfg.processes}")


def _pens(cfg: TileConfig) -> tuple[str, ...]:
    """The ink colours --exclude-pen takes out (none unless the mask is otsu's)."""
    return pen_colours(cfg.exclude_pen) if cfg.tissue == "otsu" else ()


def tiling_params(cfg: TileConfig) -> dict[str, Any]:
    """The options that determine a store's content (their digest decides rebuilds)."""
    return {
        "tiling_version": TILING_VERSION,
        "patch_size": cfg.patch_size,
        "stride": cfg.stride if cfg.stride is not None else cfg.patch_size,
        "level": cfg.level,
        "mpp": cfg.mpp,
        "mpp_tolerance": cfg.mpp_tolerance,
        "slide_mpp": cfg.slide_mpp,
        # only when given: stores made before the option existed keep their digest
        **({"significant_bits": cfg.significant_bits} if cfg.significant_bits else {}),
        "tissue": cfg.tissue,
        "min_tissue": cfg.min_tissue,
        # only when it acts: stores made before the option existed keep their digest
        **({"exclude_pen": list(pens)} if (pens := _pens(cfg)) else {}),
        "thumbnail_px": cfg.thumbnail_px,
        "pixels": cfg.pixels,
        "compression": cfg.compression if cfg.pixels else None,
        "backend": cfg.backend,
        # the chunking of patches up to 295 px; larger patches get fewer per chunk
        # (chunk_patches()), which leaves their pixels and so the digest as they were
        "chunk_patches": CHUNK_PATCHES,
    }


#: read threads per tiling process when --workers is not given. Past about 8, the Python
#: share of each tile's work (run under the GIL) stops more threads from helping: on a
#: 16-core node one 16,384^2 slide took 0.51 s with 8 threads, 0.77 s with 16 and 0.86 s
#: with 4 (bench/tile.py --workers N --stores /dev/shm/x)
DEFAULT_MAX_READ_THREADS = 8


def read_threads(workers: int | None, processes: int = 1, cpus: int | None = None) -> int:
    """Read threads of each of ``processes`` tiling processes: ``workers`` shared out among
    them, or by default the CPUs this job may use (``cpus``) shared out, at most
    :data:`DEFAULT_MAX_READ_THREADS`."""
    per = max(1, processes)
    if workers is not None:
        return max(1, workers // per)
    cpus = available_cpus() if cpus is None else cpus
    return max(1, min(DEFAULT_MAX_READ_THREADS, cpus // per))


def tile_slides(
    cfg: TileConfig,
    entries: Sequence[Any],
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    debug: bool = False,
) -> BatchResult:
    """Tile every slide of shard ``shard`` = (I, N) of ``entries`` (SlideEntry) into ``W/patches``.

    Returns the BatchResult (exit_code 0: all done or current, 1: some slides failed, listed
    in ``W/failures.csv``). Raises ConfigError for bad options.
    """
    validate_config(cfg)
    work = Path(cfg.work)
    out = make_output_dir(patches_dir(work), "--work")
    save_resolved(cfg, out / "config.yaml")
    items = shard_items(list(entries), shard, key=lambda e: e.slide_id)
    with contextlib.ExitStack() as stack:
        if cfg.processes > 1 and len(items) > 1:
            # each process tiles one slide at a time with its share of the threads
            per_process = dataclasses.replace(cfg, workers=read_threads(cfg.workers, cfg.processes))
            fn: Any = functools.partial(_tile_slide_in_worker, per_process)
        else:
            pool = stack.enter_context(
                ThreadPoolExecutor(read_threads(cfg.workers), thread_name_prefix="tile-read")
            )
            fn = lambda e: tile_slide(cfg, e, pool=pool, progress=progress)  # noqa: E731
        return run_per_slide(
            "tile",
            items,
            fn,
            work,
            slide_id=lambda e: e.slide_id,
            slide_path=lambda e: e.path,
            progress=progress,
            debug=debug,
            processes=cfg.processes,
        )


_worker_pool: ThreadPoolExecutor | None = None


def _tile_slide_in_worker(cfg: TileConfig, entry: Any) -> Path:
    """:func:`tile_slide` in a worker process of ``--processes``, with a read pool of
    ``cfg.workers`` threads kept for the process's next slides."""
    global _worker_pool
    if _worker_pool is None:
        _worker_pool = ThreadPoolExecutor(cfg.workers or 1, thread_name_prefix="tile-read")
    return tile_slide(cfg, entry, pool=_worker_pool)


def current_digests(cfg: TileConfig) -> set[str]:
    """Digests of stores that ``cfg`` takes as current: its own parameters under any of the
    lossless compressions (the pixels are the same; ``--overwrite`` rebuilds such a store)."""
    params = tiling_params(cfg)
    if not cfg.pixels:
        return {params_digest(params)}
    return {params_digest({**params, "compression": c}) for c in COMPRESSIONS}


def current_store(
    final: Path, fingerprint: dict | None, digests: Collection[str]
) -> PatchStore | None:
    """The store at ``final`` if it is complete, of the same slide file, and its parameters
    digest is one of ``digests`` (see :func:`current_digests`); else None."""
    if not final.exists():
        return None
    try:
        store = PatchStore.open(final)
    except StoreError:
        return None
    if (
        len(store) == 0
        and store.attrs.get("tissue_method") == "otsu"
        and store.attrs.get("tissue_scores", 1) < TISSUE_SCORES
    ):
        # tissue scores before TISSUE_SCORES found nothing in grey and fluorescence images:
        # such empty stores are made again (stores with patches keep their masks)
        return None
    current = (
        store.attrs.get("params_digest") in digests
        and store.attrs.get("slide_fingerprint") == fingerprint
    )
    return store if current else None


def tile_slide(
    cfg: TileConfig,
    entry: Any,
    pool: ThreadPoolExecutor | None = None,
    progress: bool = False,
) -> Path:
    """Tile one slide (``entry``: SlideEntry) into ``W/patches/<slide_id>.zarr``; returns the path.

    Raises Skip when the store is current (or another process holds its lock) and
    SlideWarning after writing an empty store for a slide without tissue.
    """
    from wsi_mil.slides import open_slide

    sid = entry.slide_id
    if entry.path is None:
        raise SlideError(
            f"{sid}: the slide table gives no path", "add the slide's path to the table"
        )
    path = Path(entry.path)
    final = patches_dir(cfg.work) / f"{sid}.zarr"
    digest = params_digest(tiling_params(cfg))
    if not path.exists():
        raise SlideError(f"{path}: file not found", "check the slide table's path column")
    fingerprint = file_fingerprint(path)
    with output_lock(final) as held:
        if not held:
            log.info("%s: another process is writing %s; leaving it to that process", sid, final)
            raise Busy(sid)
        store = None if cfg.overwrite else current_store(final, fingerprint, current_digests(cfg))
        if store is not None:
            stored = store.attrs.get("compression")
            if cfg.pixels and len(store) and stored != cfg.compression:
                log.debug(
                    "%s: keeping %s, whose pixels are stored with compression %s (the same "
                    "pixels); --overwrite rebuilds it with %s",
                    sid,
                    final,
                    stored,
                    cfg.compression,
                )
            if cfg.clam_h5 and not clam_h5_current(clam_h5_path(cfg.work, sid), store):
                write_clam_h5(store, clam_h5_path(cfg.work, sid), sid)
            raise Skip(sid)
        remove_stale_tmps(final)
        # a CLAM coords file of the store being replaced would describe the wrong grid
        clam_h5_path(cfg.work, sid).unlink(missing_ok=True)
        with open_slide(
            path, backend=cfg.backend, mpp=cfg.slide_mpp, significant_bits=cfg.significant_bits
        ) as slide:
            n = _build_store(cfg, sid, path, slide, final, fingerprint, digest, pool, progress)
        if cfg.clam_h5:
            write_clam_h5(PatchStore.open(final), clam_h5_path(cfg.work, sid), sid)
    if n == 0:
        raise SlideWarning(
            f"no tissue found in {path} (tissue={cfg.tissue}, min-tissue={cfg.min_tissue}); "
            f"wrote an empty patch store {final} that later stages skip "
            "(try --tissue none for all-foreground images, or a lower --min-tissue)"
        )
    return final


def _build_store(
    cfg: TileConfig,
    sid: str,
    path: Path,
    slide: Any,
    final: Path,
    fingerprint: dict | None,
    digest: str,
    pool: ThreadPoolExecutor | None,
    progress: bool,
) -> int:
    w0, h0 = slide.dimensions
    choice = choose_level(
        slide.level_downsamples,
        cfg.patch_size,
        cfg.stride,
        level=cfg.level,
        target_mpp=cfg.mpp,
        slide_mpp=slide.mpp,
        mpp_tolerance=cfg.mpp_tolerance,
    )
    lw, lh = slide.level_dimensions[choice.level]
    if (
        choice.patch_px_level > max(lw, lh, choice.patch_px)
        and 3 * choice.patch_px_level**2 > MAX_WINDOW_BYTES
    ):
        # one patch would hold the whole slide, mostly white, and reading its window at
        # the level (before shrinking it) would take gigabytes: a small image at a large
        # --mpp, or a slide whose mpp is recorded wrongly (a patch somewhat larger than a
        # small image is fine: one padded patch, as for a TMA core)
        whole_mpp = round_down(slide.mpp * max(w0, h0) / cfg.patch_size)
        raise SlideError(
            f"{path}: at --mpp {cfg.mpp:g} one {cfg.patch_size} px patch spans "
            f"{choice.patch_px_level0:,.0f} level-0 px, more than the whole slide "
            f"({w0:,} x {h0:,} px at {slide.mpp:g} mpp)",
            f"use --mpp {whole_mpp:.3g} or less (one patch then covers the whole slide), or "
            "check the slide's mpp (--slide-mpp)",
        )
    if choice.patch_px > MAX_UPSAMPLE * choice.patch_px_level:
        # patches blown up from a few px each: no information, and a store that can fill
        # the disk (an --mpp in the wrong unit, or a slide whose recorded mpp is wrong)
        raise SlideError(
            f"{path}: --mpp {cfg.mpp:g} is {slide.mpp / cfg.mpp:.3g}x "
            f"finer than the slide's level 0 ({slide.mpp:g} mpp): each {cfg.patch_size} px "
            f"patch would be enlarged from {choice.patch_px_level} px",
            f"use --mpp {slide.mpp / MAX_UPSAMPLE:.3g} or more (at most {MAX_UPSAMPLE}x "
            "enlarged), or check the slide's mpp (--slide-mpp)",
        )
    level_xy = grid_level_xy(lw, lh, choice.stride_level)
    level0_xy = level_to_level0_xy(level_xy, choice.level_downsample)

    tw, th = thumbnail_size((w0, h0), cfg.thumbnail_px)
    scale = (w0 / tw, h0 / th)  # level-0 px per thumbnail px
    if cfg.tissue == "none":
        # no mask to compute: the thumbnail is only needed for the QC image, made beside the pixels
        thumb = mask = None
        tissue = inside_fraction(level0_xy, choice.patch_px_level0, w0, h0)
        keep = np.ones(len(level0_xy), bool)
    else:
        thumb = slide.thumbnail(cfg.thumbnail_px, pool=pool)
        mask = tissue_mask(thumb, cfg.tissue, exclude_pen=_pens(cfg))
        tissue = patch_tissue_fraction(mask, scale, level0_xy, choice.patch_px_level0)
        keep = tissue >= cfg.min_tissue
    level_xy, level0_xy, tissue = level_xy[keep], level0_xy[keep], tissue[keep]
    attrs = _store_attrs(cfg, sid, path, slide, choice, fingerprint, digest, (th, tw))

    def qc_png(thumb: np.ndarray | None, mask: np.ndarray | None) -> None:
        qc_scale = scale
        if thumb is None:  # --tissue none: a thumbnail the size of the QC image will do
            thumb = slide.thumbnail(min(cfg.thumbnail_px, QC_MAX_PX))
            mask = tissue_mask(thumb, cfg.tissue)
            qc_scale = (w0 / thumb.shape[1], h0 / thumb.shape[0])
        path = masks_dir(cfg.work) / f"{sid}.png"
        write_mask_png(path, thumb, mask, level0_xy, choice, qc_scale)

    # the QC PNG (serial numpy + zlib work) is drawn while the pixels are read and written
    with ThreadPoolExecutor(1, thread_name_prefix="tile-qc") as qc:
        png = qc.submit(qc_png, thumb, mask)
        with PatchStoreWriter(
            final,
            level0_xy,
            attrs,
            pixels=cfg.pixels,
            chunk_patches=chunk_patches(cfg.patch_size),
            compressors=cfg.compression,
            tissue=tissue,
            encode_threads=cfg.workers,  # a share of the CPUs with --processes
        ) as writer:
            if cfg.pixels and len(level_xy):
                _write_pixels(
                    writer, slide, choice, level_xy, pool, progress, sid, workers=cfg.workers
                )
            png.result()  # a slide is done when its QC image is written too
            writer.commit()
    return len(level0_xy)


def _store_attrs(
    cfg: TileConfig,
    sid: str,
    path: Path,
    slide: Any,
    choice: LevelChoice,
    fingerprint: dict | None,
    digest: str,
    thumb_shape: tuple[int, int],
) -> dict[str, Any]:
    w0, h0 = slide.dimensions
    lw, lh = slide.level_dimensions[choice.level]
    return {
        "slide_id": sid,
        "slide_path": str(path.resolve()),
        "slide_fingerprint": fingerprint,
        "backend": slide.backend,
        "level": choice.level,
        "level_downsample": choice.level_downsample,
        "downsample": choice.downsample,
        "patch_size": choice.patch_px,
        "patch_size_level": choice.patch_px_level,
        "patch_size_level0": choice.patch_px_level0,
        "stride": cfg.stride if cfg.stride is not None else cfg.patch_size,
        "stride_level": choice.stride_level,
        "mpp": slide.mpp,
        "target_mpp": cfg.mpp,
        "output_mpp": None if slide.mpp is None else slide.mpp * choice.downsample,
        "level0_width": int(w0),
        "level0_height": int(h0),
        "level_width": int(lw),
        "level_height": int(lh),
        "tissue_method": cfg.tissue,
        "min_tissue": cfg.min_tissue,
        "thumbnail_size": [int(thumb_shape[1]), int(thumb_shape[0])],
        "compression": cfg.compression if cfg.pixels else None,
        "params": tiling_params(cfg),
        "significant_bits": cfg.significant_bits,
        "tissue_scores": TISSUE_SCORES,
        "params_digest": digest,
    }


def _write_pixels(
    writer: PatchStoreWriter,
    slide: Any,
    choice: LevelChoice,
    level_xy: np.ndarray,
    pool: ThreadPoolExecutor | None,
    progress: bool,
    sid: str,
    workers: int | None = None,
) -> None:
    """Cut patches tile-aligned (blocks decoded in ``pool``, or in a pool of
    :func:`read_threads` of ``workers`` made here) and hand each chunk to the writer's
    encode + write pool as soon as it is cut."""
    from tqdm.auto import tqdm

    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(read_threads(workers), thread_name_prefix="tile-read")
    p = choice.patch_px
    # chunk buffers recycled between filling (the read pool) and encoding + writing (the
    # writer's pool): fresh memory for every chunk would cost page faults on every chunk.
    # Page-aligned, so chunk files can be written with O_DIRECT straight from them. As many
    # exist as chunks are open at once (about two rows of patches) plus the writes allowed
    # in flight.
    free: queue.SimpleQueue = queue.SimpleQueue()
    lent: dict[int, np.ndarray] = {}  # address -> recycled buffer a chunk was cut into
    max_writes = 2 * pool_workers(pool) + 2

    def get_buffer(n: int) -> np.ndarray:
        try:
            buf = free.get_nowait()
        except queue.Empty:
            buf = aligned_empty((writer.chunk_rows, p, p, 3))
        lent[buf.ctypes.data] = buf
        return buf[:n]

    in_flight: collections.deque[Future] = collections.deque()
    bar = tqdm(total=len(level_xy), desc=sid, unit="patch", disable=not progress, leave=False)
    try:
        chunks = iter_patch_chunks(
            slide,
            choice.level,
            level_xy,
            choice.patch_px_level,
            choice.patch_px,
            writer.chunk_rows,
            pool,
            get_buffer=get_buffer,
        )
        for start, arr in chunks:
            buf, n = lent.pop(arr.ctypes.data), len(arr)
            cp = writer.chunk_rows  # chunk_patches(), or fewer in a store of fewer patches
            if n < cp:
                # the short last chunk is stored full size: pad it in its own buffer rather
                # than have the writer copy it into a fresh one (~15 ms at the end of a slide)
                buf[n:cp] = writer.fill_value
                arr = buf[:cp]
            fut = writer.write_chunk_async(start, arr)
            fut.add_done_callback(lambda _, buf=buf: free.put(buf))
            in_flight.append(fut)
            # raises a failed write here, early; waits when the writer falls behind
            while in_flight and (in_flight[0].done() or len(in_flight) > max_writes):
                in_flight.popleft().result()
            bar.update(n)
        while in_flight:
            in_flight.popleft().result()
    finally:
        bar.close()
        if own_pool:
            pool.shutdown(wait=True, cancel_futures=True)


def write_mask_png(
    path: Path,
    thumb: np.ndarray,
    mask: np.ndarray,
    level0_xy: np.ndarray,
    choice: LevelChoice,
    level0_per_thumb_px: tuple[float, float],
) -> None:
    """QC image (:func:`~wsi_mil.tiling.qc.qc_image`: thumbnail, tissue tinted green, kept
    patches outlined in blue) written as a PNG (atomic write)."""
    import imagecodecs

    img = qc_image(thumb, mask, level0_xy, choice.patch_px_level0, level0_per_thumb_px)
    path.parent.mkdir(parents=True, exist_ok=True)
    # libpng with OpenCV's fast settings (zlib level 1, RLE, SUB filter): ~3x faster than Pillow
    data = imagecodecs.png_encode(img, level=1, strategy=3, filter=16)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def clam_h5_path(work: str | Path, slide_id: str) -> Path:
    """CLAM's layout: ``W/patches/<slide_id>.h5``."""
    return patches_dir(work) / f"{slide_id}.h5"


def clam_h5_current(path: Path, store: PatchStore) -> bool:
    """Whether the CLAM coords file ``path`` exists and describes ``store``'s grid (same
    coords, ``patch_size`` and ``patch_level``)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            d = f["coords"]
            return (
                int(d.attrs["patch_size"]) == int(store.patch_size_level)
                and int(d.attrs["patch_level"]) == int(store.level)
                and d.shape == (len(store), 2)
                and np.array_equal(d[:], store.coords)
            )
    except (OSError, KeyError, TypeError, ValueError):  # missing, unreadable or not ours
        return False


def write_clam_h5(store: PatchStore, path: Path, slide_id: str) -> None:
    """CLAM/TRIDENT coords file: dataset ``coords`` (N, 2) int64 level-0 xy with attrs
    ``patch_size`` (px at ``patch_level``) and ``patch_level``, so their feature extractors
    read our grid."""
    import h5py

    a = store.attrs
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        d = f.create_dataset("coords", data=store.coords.astype(np.int64))
        d.attrs["patch_size"] = int(store.patch_size_level)
        d.attrs["patch_level"] = int(store.level)
        d.attrs["downsample"] = np.array([a["level_downsample"]] * 2, np.float64)
        d.attrs["level_dim"] = np.array([a["level_width"], a["level_height"]], np.int64)
        d.attrs["downsampled_level_dim"] = d.attrs["level_dim"]
        d.attrs["patch_size_level0"] = int(round(float(a["patch_size_level0"])))
        d.attrs["name"] = slide_id
        d.attrs["save_path"] = str(path.parent)
