"""``wsi-mil heatmap``: attention overlays for every slide of a run, and the localisation report.

Per slide with ``R/attention/<id>.h5``:

- ``R/heatmaps/<id>.png``: the slide thumbnail (``--thumbnail-px`` longest side) with the
  seed's blue attention boxes (``style`` boxes or both) or the smooth colour map (smooth),
  plus the true markers as green boxes when a ``markers.csv`` is found. The PNG has the
  thumbnail's exact geometry: PNG px (u, v) shows level-0 px (u, v) * level0 / thumbnail.
- ``R/heatmaps/<id>_smooth.png`` (style both) and ``R/heatmaps/<id>_topk.png`` (the k most
  attended patches read from the slide at full resolution, framed green on a marker, red off).
- ``R/localisation.json``: see :mod:`wsi_mil.viz.localisation`.

A slide file that cannot be found (moved, or never known) does not stop the picture: the
boxes are drawn on a white canvas of the slide's level-0 shape and the slide gets a warning
(no top-k crops). A slide file that exists but cannot be read is a failure (failures.csv).
The slide is read with the bit depth the attention file records (``significant_bits``, from
``tile --significant-bits``), so 12-bit data in uint16 files is drawn as tiling read it.
PNGs carry a digest of their inputs and options; current ones are skipped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.batch import (
    BatchResult,
    Busy,
    Skip,
    SlideWarning,
    atomic_path,
    clean_stale_tmp,
    file_fingerprint,
    output_lock,
    params_digest,
    run_per_slide,
    shard_items,
)
from wsi_mil.config import HeatmapConfig, save_resolved
from wsi_mil.errors import ConfigError, StoreError
from wsi_mil.viz.attention import (
    AttentionMap,
    attention_content_digest,
    attention_files,
    check_slide_id,
    read_attention,
    read_significant_bits,
    resolve_slide_paths,
)
from wsi_mil.viz.heatmap import (
    SCALES,
    draw_attention_boxes,
    draw_marker_boxes,
    draw_smooth_heatmap,
    thumbnail_size,
    topk_strip,
)
from wsi_mil.viz.localisation import (
    find_markers_csv,
    localisation_report,
    patch_marker_overlap,
    read_markers,
    summary_lines,
    top_k_indices,
    write_report,
)

log = logging.getLogger(__name__)

STYLES = ("boxes", "smooth", "both")
RENDER_VERSION = 1  # bump when the drawing changes, so existing PNGs are redrawn
DIGEST_KEY = "wsi_mil_digest"
TOPK_MAX_READ_PX = 512  # top-k crops larger than this at level 0 are read from a coarser level


@dataclass
class HeatmapResult(BatchResult):
    """:class:`BatchResult` plus the localisation report (None without markers)."""

    localisation: dict[str, Any] | None = None
    localisation_path: Path | None = None

    def summary(self) -> str:
        s = super().summary()
        if self.localisation is not None:
            s += "\n" + "\n".join(summary_lines(self.localisation))
            s += f"\n  written to {self.localisation_path}"
        return s


def heatmap_dir(run: str | os.PathLike) -> Path:
    return Path(run) / "heatmaps"


def _check(cfg: HeatmapConfig) -> None:
    if cfg.style not in STYLES:
        raise ConfigError(f"unknown --style {cfg.style!r}", f"choose one of {', '.join(STYLES)}")
    if cfg.thumbnail_px < 16:
        raise ConfigError(f"--thumbnail-px {cfg.thumbnail_px} is too small", "use >= 16")
    if cfg.top_k < 0:
        raise ConfigError(f"--top-k {cfg.top_k} is negative", "use 0 (no crops) or more")
    if cfg.scale not in SCALES:
        raise ConfigError(f"unknown --scale {cfg.scale!r}", f"choose one of {', '.join(SCALES)}")
    if not 0.0 < cfg.max_alpha <= 1.0:
        raise ConfigError(f"--max-alpha {cfg.max_alpha} is outside (0, 1]")
    if cfg.processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {cfg.processes}")


def make_heatmaps(
    cfg: HeatmapConfig,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    debug: bool = False,
) -> HeatmapResult:
    """Draw the heatmaps of run ``cfg.run`` (all slides, or ``cfg.slide_id``) and, without
    ``slide_id`` on shard 0, write ``R/localisation.json`` where markers are known."""
    _check(cfg)
    run = Path(cfg.run)
    files = attention_files(run)
    if cfg.slide_id:
        check_slide_id(files, cfg.slide_id, run)
        files = {cfg.slide_id: files[cfg.slide_id]}
    if cfg.markers:  # given explicitly: a bad table is a usage error, reported once up front
        if not Path(cfg.markers).is_file():
            raise ConfigError(
                f"markers file {cfg.markers} does not exist", "check the --markers path"
            )
        _markers_table(Path(cfg.markers))
    paths = resolve_slide_paths(run, files, cfg.slides)
    out_dir = heatmap_dir(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out_dir, max_age_s=6 * 3600)
    save_resolved(cfg, out_dir / "config.yaml")
    ids = shard_items(list(files), shard, key=lambda s: s)
    # one job per slide: (slide id, attention file, slide path), plain data that
    # --processes sends to worker processes
    jobs = [(s, files[s], paths.get(s)) for s in ids]
    res = run_per_slide(
        "heatmap",
        jobs,
        functools.partial(_render_job, cfg, out_dir),
        cfg.work or run,
        slide_id=lambda job: job[0],
        slide_path=lambda job: job[2],
        progress=progress,
        debug=debug,
        processes=cfg.processes,
    )
    result = HeatmapResult(**vars(res))
    if cfg.slide_id is None and shard[0] == 0:
        report = localisation_report(run, cfg.markers, k=max(1, cfg.top_k), slides_csv=cfg.slides)
        if report["n_slides"] > 0:
            result.localisation_path = run / "localisation.json"
            write_report(report, result.localisation_path)
            result.localisation = report
        else:
            log.info("no markers.csv found for any slide: no localisation report")
    return result


# ---------------------------------------------------------------- one slide
def _digest(
    cfg: HeatmapConfig,
    att_file: Path,
    slide_path: Path | None,
    boxes: np.ndarray | None,
    significant_bits: int | None = None,
) -> str:
    slide_fp = None
    if slide_path is not None and Path(slide_path).exists():
        slide_fp = file_fingerprint(slide_path)
    # only when set, so the PNGs of 8-bit slides keep the digest of earlier versions
    bits = {"significant_bits": significant_bits} if significant_bits else {}
    return params_digest(
        {
            **bits,
            "render": RENDER_VERSION,
            "style": cfg.style,
            "thumbnail_px": cfg.thumbnail_px,
            "top_k": cfg.top_k,
            "max_alpha": cfg.max_alpha,
            "scale": cfg.scale,
            "attention": attention_content_digest(att_file),
            "slide": [str(slide_path), slide_fp],
            "markers": None if boxes is None else boxes.tolist(),
        }
    )


def _outputs(cfg: HeatmapConfig, out_dir: Path, sid: str, has_slide: bool) -> list[Path]:
    """Files this slide should have; the main PNG last (it is written last)."""
    extra = []
    if cfg.style == "both":
        extra.append(out_dir / f"{sid}_smooth.png")
    if cfg.top_k > 0 and has_slide:
        extra.append(out_dir / f"{sid}_topk.png")
    return [*extra, out_dir / f"{sid}.png"]


def png_digest(path: Path) -> str | None:
    """The input digest stored in one of our PNGs (None if absent or unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.info.get(DIGEST_KEY)
    except (OSError, ValueError):
        return None


def write_png(arr: np.ndarray, final: Path, text: dict[str, str] | None = None) -> None:
    """Atomic PNG write with optional text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with atomic_path(final) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(
            tmp, format="PNG", pnginfo=info, compress_level=3
        )


def _render_job(cfg: HeatmapConfig, out_dir: Path, job: tuple[str, Path, Path | None]) -> None:
    """run_per_slide's per-slide function (module level, so worker processes can run it).
    A bad markers table fails the slides that use it, not the batch."""
    sid, att_file, slide_path = job
    mp = find_markers_csv(cfg.markers, cfg.slides, slide_path)
    boxes = None if mp is None else _markers_table(mp).get(sid, np.zeros((0, 4), np.int64))
    render_slide(cfg, att_file, slide_path, boxes, out_dir)


def _markers_table(path: Path) -> dict[str, np.ndarray]:
    """read_markers(path), read once per process while the file is unchanged."""
    st = path.stat()
    return _read_markers_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_markers_cached(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
    return read_markers(Path(path))


def render_slide(
    cfg: HeatmapConfig,
    att_file: Path,
    slide_path: Path | None,
    marker_boxes: np.ndarray | None,
    out_dir: Path,
) -> list[Path]:
    """Draw one slide's PNGs (see module doc); returns the files written.

    Raises :class:`Skip` when they are current, :class:`SlideWarning` after drawing on a
    blank canvas because the slide file is missing.
    """
    sid = att_file.stem
    bits = read_significant_bits(att_file)
    digest = _digest(cfg, att_file, slide_path, marker_boxes, bits)
    slide_ok = slide_path is not None and Path(slide_path).exists()
    outs = _outputs(cfg, out_dir, sid, slide_ok)
    # lock files live in heatmaps/.locks so the PNG folder holds only pictures
    with output_lock(out_dir / ".locks" / outs[-1].name) as held:
        if not held:
            raise Busy(sid)  # another process is drawing this slide right now
        if not cfg.overwrite and all(p.is_file() for p in outs) and png_digest(outs[-1]) == digest:
            raise Skip
        am = read_attention(att_file)
        if not am.has_coords:
            raise StoreError(
                f"{att_file}: no patch coordinates (features without coords)",
                "a heatmap needs coords; re-extract features with coordinates",
            )
        warnings: list[str] = []
        slide = None
        if slide_ok:
            from wsi_mil.slides import open_slide

            # the bits the digest holds, so that the PNG says how it was drawn
            slide = open_slide(  # unreadable: the slide fails
                slide_path, backend=cfg.backend, significant_bits=bits
            )
        else:
            where = f"slide file {slide_path} not found" if slide_path else "no slide path known"
            warnings.append(
                f"{where}; drew the attention on a blank canvas (pass --slides CSV to point at the slides)"
            )
        try:
            written = _draw(cfg, am, slide, marker_boxes, out_dir, digest, warnings)
        finally:
            if slide is not None:
                slide.close()
    if warnings:
        raise SlideWarning("; ".join(warnings))
    return written


def _size_mismatch(am: AttentionMap, level0: tuple[int, ...]) -> str | None:
    """What in the attention file does not fit a slide of ``level0`` (width, height), or None.

    A recorded size smaller than the slide is no mismatch: stores without the slide size
    (CLAM's h5_files) leave predict only the extent of the patches to record, and that
    extent runs past the slide's right and bottom edges when edge patches do (CLAM pads
    them), so a recorded size equal to it is not compared. No patch may start outside it.
    """
    w, h = (int(v) for v in am.level0_size)
    extent = None
    if len(am.coords) and am.has_coords:
        x, y = (int(v) for v in am.coords.max(axis=0))
        if x >= level0[0] or y >= level0[1]:
            return f"has patches at up to x={x}, y={y}"
        extent = (x + am.patch_size_level0, y + am.patch_size_level0)
    if (w, h) != extent and (w > level0[0] or h > level0[1]):
        return f"says {w}x{h}"
    return None


def _draw(
    cfg: HeatmapConfig,
    am: AttentionMap,
    slide: Any,
    marker_boxes: np.ndarray | None,
    out_dir: Path,
    digest: str,
    warnings: list[str],
) -> list[Path]:
    sid = am.path.stem
    if slide is not None:
        level0 = tuple(int(v) for v in slide.dimensions)
        mismatch = _size_mismatch(am, level0)
        if mismatch:
            warnings.append(
                f"slide is {level0[0]}x{level0[1]} px but the attention file {mismatch}: "
                "is it the same slide?"
            )
        thumb = slide.thumbnail(cfg.thumbnail_px)
    else:
        level0 = am.level0_size
        tw, th = thumbnail_size(level0, cfg.thumbnail_px)
        thumb = np.full((th, tw, 3), 255, np.uint8)
    args = (am.coords, am.attention, am.patch_size_level0, level0)
    smooth_alpha = min(cfg.max_alpha, 0.6)

    def with_markers(img: np.ndarray) -> np.ndarray:
        if marker_boxes is None or len(marker_boxes) == 0:
            return img
        return draw_marker_boxes(img, marker_boxes, level0)

    text = {
        "slide_id": sid,
        "n_patches": str(len(am)),
        "level0_size": f"{level0[0]}x{level0[1]}",
        "style": cfg.style,
        "scale": cfg.scale,
        "prob": "" if am.prob is None else f"{am.prob:.6f}",
        "label": str(am.label),
    }
    written: list[Path] = []
    main_img: np.ndarray
    if cfg.style == "smooth":
        main_img = with_markers(
            draw_smooth_heatmap(thumb, *args, max_alpha=smooth_alpha, scale=cfg.scale)
        )
    else:
        main_img = with_markers(
            draw_attention_boxes(thumb, *args, max_alpha=cfg.max_alpha, scale=cfg.scale)
        )
        if cfg.style == "both":
            sm = with_markers(
                draw_smooth_heatmap(thumb, *args, max_alpha=smooth_alpha, scale=cfg.scale)
            )
            p = out_dir / f"{sid}_smooth.png"
            write_png(sm, p, {**text, "style": "smooth"})
            written.append(p)
    if cfg.top_k > 0 and slide is not None:
        p = out_dir / f"{sid}_topk.png"
        write_png(_topk_image(slide, am, marker_boxes, cfg.top_k), p, {**text, "style": "topk"})
        written.append(p)
    p = out_dir / f"{sid}.png"
    write_png(main_img, p, {**text, DIGEST_KEY: digest})  # last: its digest marks completion
    written.append(p)
    return written


def _topk_image(
    slide: Any, am: AttentionMap, marker_boxes: np.ndarray | None, k: int
) -> np.ndarray:
    """Strip of the ``k`` most-attended patches read from the slide (bounded size per crop)."""
    import math

    ps0 = max(1, am.patch_size_level0)
    level = 0
    if ps0 > TOPK_MAX_READ_PX:
        level = slide.get_best_level_for_downsample(ps0 / TOPK_MAX_READ_PX)
    ds = slide.level_downsamples[level]
    size = max(1, int(math.ceil(ps0 / ds)))
    idx = top_k_indices(am.attention, k)
    hit = None
    if marker_boxes is not None:
        hit = patch_marker_overlap(am.coords[idx], ps0, marker_boxes)
    peak = float(am.attention.max())
    tiles, captions = [], []
    for rank, i in enumerate(idx, start=1):
        x, y = (int(v) for v in am.coords[i])
        tiles.append(slide.read_region(level, x, y, size, size))
        a = float(am.attention[i])
        rel = a / peak if peak > 0 else 0.0
        captions.append(f"#{rank} a={a:.3g} ({rel:.2f} max)\nx={x} y={y}")
    hits = None if hit is None else [bool(v) for v in hit]
    return topk_strip(tiles, captions, hits)


def load_report(run: str | os.PathLike) -> dict[str, Any]:
    """Read ``R/localisation.json``."""
    p = Path(run) / "localisation.json"
    if not p.is_file():
        raise StoreError(f"{p} does not exist", "run 'wsi-mil heatmap' with markers first")
    return json.loads(p.read_text())
