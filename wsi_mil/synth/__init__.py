"""Synthetic slides with known ground truth: ``generate(cfg) -> list[SlideEntry]``.

Outputs in ``cfg.out``: one slide per entry (``<id>.tiff`` | ``<id>.ome.zarr`` |
``<id>.jpg`` | ``<id>.png``), ``slides.csv`` (slide_id,path,label,split),
``markers.csv`` (slide_id,shape,x0,y0,x1,y1,colour,thickness,filled: level-0 px,
x1/y1 exclusive), ``synth.yaml`` (the resolved config) and, for ``preset="seed"``,
the seed's ``labels.csv`` (filename,label; no header). Same config -> same bytes in
the CSVs and the same pixels.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

from wsi_mil.batch import atomic_path, available_cpus, make_output_dir, process_pool, stop_pool
from wsi_mil.config import SynthConfig, save_resolved
from wsi_mil.slides.table import SlideEntry, write_slide_table
from wsi_mil.synth.markers import assign_splits, build_specs
from wsi_mil.synth.render import Marker, SlideSpec, render_region
from wsi_mil.synth.seed import PRESETS, parse_splits, resolve_config
from wsi_mil.synth.writers import (
    count_tiles,
    level_shapes,
    single_threaded_blas,
    write_image,
    write_ome_zarr,
    write_tiff,
)

__all__ = [
    "PRESETS",
    "Marker",
    "SlideSpec",
    "SynthConfig",
    "build_specs",
    "generate",
    "level_shapes",
    "render_region",
    "resolve_config",
    "write_slide",
]

log = logging.getLogger(__name__)

EXTENSIONS = {"tiff": ".tiff", "ome-zarr": ".ome.zarr", "jpeg": ".jpg", "png": ".png"}
MARKER_COLUMNS = ["slide_id", "shape", "x0", "y0", "x1", "y1", "colour", "thickness", "filled"]


def write_slide(spec: SlideSpec, path: Path, cfg: SynthConfig, progress=None) -> None:  # noqa: ANN001
    """Write one slide in ``cfg.format`` to ``path`` (atomically: temp name, then rename)."""
    workers = cfg.workers or available_cpus()
    with atomic_path(path) as tmp, single_threaded_blas():
        if cfg.format == "tiff":
            write_tiff(
                spec,
                tmp,
                mpp=cfg.mpp,
                tile_px=cfg.tile_px,
                jpeg_quality=cfg.jpeg_quality,
                workers=workers,
                progress=progress,
            )
        elif cfg.format == "ome-zarr":
            write_ome_zarr(
                spec,
                tmp,
                mpp=cfg.mpp,
                tile_px=cfg.tile_px,
                zarr_format=cfg.zarr_format,
                workers=workers,
                progress=progress,
            )
        else:
            write_image(
                spec,
                tmp,
                fmt=cfg.format,
                mpp=cfg.mpp,
                jpeg_quality=cfg.jpeg_quality,
                tile_px=cfg.tile_px,
                workers=workers,
                progress=progress,
            )


def generate(cfg: SynthConfig, progress: bool = False) -> list[SlideEntry]:
    """Write ``cfg.n_slides`` synthetic slides and their tables into ``cfg.out``.

    ``cfg`` fields left None take the preset's values. Returns the slide-table entries
    (absolute paths). Raises ConfigError for bad options before writing anything.

    Several large slides are written at once in worker processes (:func:`slide_processes`;
    started with ``spawn``), so a script that calls this must guard its entry point with
    ``if __name__ == "__main__":``, as for any multiprocessing code; ``workers=1`` writes
    one slide at a time in this process.
    """
    cfg = resolve_config(cfg)
    out = Path(cfg.out)
    specs = build_specs(cfg)
    splits = assign_splits([s.label for s in specs], parse_splits(cfg.splits), cfg.seed)
    make_output_dir(out, "OUT folder")
    earlier = _earlier_slides(out)
    ext = EXTENSIONS[cfg.format]
    entries: list[SlideEntry] = []

    paths = [(out / f"{s.slide_id}{ext}").resolve() for s in specs]
    procs = slide_processes(cfg, specs)
    if procs > 1:
        _write_slides_in_processes(specs, paths, cfg, procs, progress)
    else:
        _write_slides_in_threads(specs, paths, cfg, progress)
    for spec, path, split in zip(specs, paths, splits, strict=True):
        entries.append(SlideEntry(spec.slide_id, path, spec.label, split))
        log.debug("wrote %s (label %d, %d markers)", path, spec.label, len(spec.markers))

    _write_markers(specs, out / "markers.csv")
    with atomic_path(out / "slides.csv") as tmp:
        write_slide_table(entries, tmp)
    if cfg.preset == "seed":
        with atomic_path(out / "labels.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            for e in entries:
                w.writerow([e.path.name, e.label])
    save_resolved(cfg, out / "synth.yaml")
    _warn_stale_slides(out, earlier, paths)
    return entries


def _earlier_slides(out: Path) -> set[Path]:
    """Slide files an earlier synth run may have left in ``out``: those its slides.csv lists
    and any ``synth_*``/``synthetic_*`` slide file."""
    from wsi_mil.slides.table import read_slide_table

    found: set[Path] = set()
    if (out / "slides.csv").is_file():
        try:
            found |= {e.path.resolve() for e in read_slide_table(out / "slides.csv") if e.path}
        except Exception:  # noqa: BLE001 - an unreadable old table: the glob below still looks
            pass
    for stem in ("synth_", "synthetic_"):
        for ext in EXTENSIONS.values():
            found |= {f.resolve() for f in out.glob(f"{stem}*{ext}")}
    return {f for f in found if f.parent == out.resolve()}


def _warn_stale_slides(out: Path, earlier: set[Path], written: list[Path]) -> None:
    """Warn about slide files of an earlier run with other options that the new tables omit
    (they are left alone: deleting files is the user's call)."""
    stale = sorted(f for f in earlier - set(written) if f.exists())
    if stale:
        names = ", ".join(f.name for f in stale[:8]) + (
            f" ... (+{len(stale) - 8} more)" if len(stale) > 8 else ""
        )
        log.warning(
            "%s still holds %d slide file(s) of an earlier synth run that the new slides.csv and "
            "markers.csv do not list: %s. Delete them (or write into an empty folder) so that "
            "globs over %s do not pick them up",
            out,
            len(stale),
            names,
            out,
        )


#: below this many level-0 pixels in all, slides are written one by one (threads render each
#: slide's tiles): starting worker processes (~1 s) would cost more than it saves
MIN_PROCESS_PIXELS = 64 * 2**20


def slide_processes(cfg: SynthConfig, specs: list[SlideSpec]) -> int:
    """Processes to write ``specs`` with: one slide per process, up to the CPUs (``workers``).

    Tile rendering is numpy with Python in between, so render threads contend for the GIL:
    on 2 CPUs two threads give 1.4x one thread, on a 16-CPU node 16 threads were slower than
    2. Whole slides in separate processes scale with the CPUs instead. 1 = no processes.
    """
    workers = cfg.workers or available_cpus()
    pixels = sum(s.width_px * s.height_px for s in specs)
    if len(specs) < 2 or workers < 2 or pixels < MIN_PROCESS_PIXELS:
        return 1
    return min(workers, len(specs))


def _write_one(spec: SlideSpec, path: Path, cfg: SynthConfig) -> Path:
    """Worker-process entry: write one slide (module level, so it pickles)."""
    write_slide(spec, path, cfg)
    return path


def _write_slides_in_processes(
    specs: list[SlideSpec], paths: list[Path], cfg: SynthConfig, procs: int, progress: bool
) -> None:
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    from wsi_mil.errors import WsiMilError

    workers = cfg.workers or available_cpus()
    # the CPUs left over (fewer slides than CPUs) render tiles in threads inside each process
    per_process = dataclasses.replace(cfg, workers=max(1, workers // procs))
    pool = process_pool(procs)
    try:
        futures = [
            pool.submit(_write_one, s, p, per_process) for s, p in zip(specs, paths, strict=True)
        ]
        with tqdm(total=len(specs), desc="synth slides", unit="slide", disable=not progress) as bar:
            for fut in as_completed(futures):
                fut.result()  # raises the first failure; the slides not started are cancelled
                bar.update(1)
    except BrokenProcessPool:
        raise WsiMilError(
            "a worker process died while writing slides (out of memory?)",
            "run again with fewer --workers: each worker process writes one slide",
        ) from None
    finally:
        stop_pool(pool)


def _write_slides_in_threads(
    specs: list[SlideSpec], paths: list[Path], cfg: SynthConfig, progress: bool
) -> None:
    from tqdm.auto import tqdm

    slides_bar = tqdm(specs, desc="synth slides", unit="slide", disable=not progress, position=0)
    for spec, path in zip(slides_bar, paths, strict=True):
        n_tiles = (
            count_tiles(spec.width_px, spec.height_px, cfg.tile_px)
            if cfg.format in ("tiff", "ome-zarr")
            else None
        )
        if n_tiles is None:
            n_tiles = -(-spec.width_px // cfg.tile_px) * -(-spec.height_px // cfg.tile_px)
        with tqdm(
            total=n_tiles,
            desc=spec.slide_id,
            unit="tile",
            disable=not progress,
            position=1,
            leave=False,
        ) as bar:
            write_slide(spec, path, cfg, progress=bar.update)


def _write_markers(specs: list[SlideSpec], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(MARKER_COLUMNS)
        for s in specs:
            for m in s.markers:
                w.writerow([s.slide_id, m.shape, *m.bbox, m.colour, m.thickness_px, int(m.filled)])
