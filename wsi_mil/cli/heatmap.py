"""`wsi-mil heatmap`: attention overlays + localisation report (thin: parse, call make_heatmaps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from wsi_mil.cli.common import (
    backend_option,
    config_option,
    debug_enabled,
    finish_batch,
    progress_enabled,
    shard_option,
)


@click.command(
    "heatmap",
    help="""Draw each slide's attention on its thumbnail; report localisation on synthetic slides.

    \b
    reads   R/attention/<slide_id>.h5     written by 'wsi-mil predict'
            the slide files               path from the attention file, or --slides CSV
            markers.csv                   --markers, else next to --slides, else next to
                                          the slide file (synthetic slides only)
    writes  R/heatmaps/<slide_id>.png     thumbnail + bold blue boxes over every patch,
                                          opacity = --max-alpha * attention / slide maximum
                                          (--style smooth: a smoothed colour map instead);
                                          true markers as green boxes
            R/heatmaps/<slide_id>_smooth.png   with --style both
            R/heatmaps/<slide_id>_topk.png     the --top-k most attended patches at full
                                          resolution, framed green on a marker, red off
            R/localisation.json           share of positive slides whose top-attended patch
                                          overlaps a marker (and any of the top k), patch-level
                                          AUC of attention vs "patch overlaps a marker"
            R/failures.csv                slides that failed (or W/failures.csv with --work)

    Only thumbnails and single patches are read, never a whole level. The PNG has the
    thumbnail's geometry (PNG px * level-0 size / PNG size = level-0 px). A slide file that
    is missing still gets its boxes drawn, on a white canvas of the slide's shape, with a
    warning; a slide that exists but cannot be read fails (logged, the others go on, exit 1).
    PNGs whose inputs and options are unchanged are skipped. localisation.json is written
    when no --slide-id is given (on shard 0) and a markers.csv is found.
    """,
)
@config_option
@click.option(
    "--run",
    "-r",
    type=click.Path(file_okay=False),
    default="runs/default",
    show_default=True,
    help="Run folder holding attention/ (from 'wsi-mil predict'); the default is train's and predict's.",
)
@click.option("--slide-id", default=None, help="Only this slide (default: every attention file).")
@click.option(
    "--style",
    type=click.Choice(["boxes", "smooth", "both"]),
    default="boxes",
    show_default=True,
    help="boxes: the seed's blue attention boxes; smooth: Gaussian-smoothed colour map; "
    "both: boxes in <id>.png and the colour map in <id>_smooth.png.",
)
@click.option(
    "--thumbnail-px",
    type=int,
    default=2048,
    show_default=True,
    help="Longest side of the drawn thumbnail in px.",
)
@click.option(
    "--top-k",
    type=int,
    default=8,
    show_default=True,
    help="Patches in <id>_topk.png and k of the top-k localisation hit rate (0: no crops).",
)
@click.option(
    "--max-alpha",
    type=float,
    default=0.85,
    show_default=True,
    help="Opacity of the most attended patch's box (others scale with their attention).",
)
@click.option(
    "--scale",
    type=click.Choice(["max", "minmax", "rank"]),
    default="max",
    show_default=True,
    help="How attention maps to opacity/colour: max = attention / slide maximum (the seed's); "
    "minmax = (a - min) / (max - min), contrast for nearly flat attention; rank = percentile.",
)
@click.option(
    "--markers",
    type=click.Path(dir_okay=False),
    default=None,
    help="markers.csv of synthetic slides (slide_id,x0,y0,x1,y1 level-0 px). Default: "
    "markers.csv next to --slides or next to each slide file, if there is one.",
)
@click.option(
    "--slides",
    "slides",
    type=click.Path(dir_okay=False),
    default=None,
    help="Slide table CSV (slide_id,path,...) whose paths win over those recorded in the "
    "attention files (e.g. after moving the slides).",
)
@click.option(
    "--work",
    "-w",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for failures.csv. Default: the run folder.",
)
@click.option(
    "--processes",
    type=int,
    default=1,
    show_default=True,
    help="Slides drawn at once, each in its own process (drawing a slide is mostly serial).",
)
@click.option("--overwrite", is_flag=True, help="Redraw even when the PNGs are current.")
@backend_option
@shard_option
def command(shard: str | None, backend: str, **kw: Any) -> None:
    from wsi_mil.batch import parse_shard
    from wsi_mil.config import HeatmapConfig
    from wsi_mil.viz import make_heatmaps

    for k in ("run", "markers", "slides", "work"):
        kw[k] = Path(kw[k]) if kw[k] else None
    cfg = HeatmapConfig(**kw, backend=None if backend == "auto" else backend)
    result = make_heatmaps(
        cfg, progress=progress_enabled(), shard=parse_shard(shard), debug=debug_enabled()
    )
    finish_batch(result)
