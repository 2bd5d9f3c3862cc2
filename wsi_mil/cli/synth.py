"""`wsi-mil synth OUT`: synthetic slides with known markers (thin: parse, call generate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from wsi_mil.cli.common import config_option, progress_enabled


@click.command(
    "synth",
    help="""Write synthetic slides with known markers into OUT.

    \b
    OUT/<id>.tiff|.ome.zarr|.jpg|.png  the slides
    OUT/slides.csv    slide_id,path,label,split (the slide-table contract)
    OUT/markers.csv   slide_id,shape,x0,y0,x1,y1,colour,thickness,filled
                      (level-0 px bounding boxes, x1/y1 exclusive)
    OUT/labels.csv    the seed's filename,label (with --preset seed)
    OUT/synth.yaml    the resolved options

    Positive slides get markers that are fully inside the slide (and fully on tissue
    with --background tissue); negatives get none. Same options + --seed give the
    same pixels and the same CSVs. Options not given take the preset's values
    (--preset custom: 8 tissue-like 8192^2 TIFFs; --preset seed: 100 noise 4096^2
    JPEGs like the seed project's generator).
    """,
)
@config_option
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(["custom", "seed"]),
    default="custom",
    show_default=True,
    help="Defaults to start from: custom (tissue TIFFs) or seed (the seed generator: noise JPEGs + labels.csv).",
)
@click.option(
    "--n-slides", "-n", type=int, default=None, help="Number of slides [preset: 8 | seed 100]."
)
@click.option(
    "--width",
    "--width-px",
    "width_px",
    type=int,
    default=None,
    help="Level-0 width in px [8192 | seed 4096].",
)
@click.option(
    "--height",
    "--height-px",
    "height_px",
    type=int,
    default=None,
    help="Level-0 height in px [8192 | seed 4096].",
)
@click.option(
    "--format",
    "format",
    type=click.Choice(["tiff", "ome-zarr", "jpeg", "png"]),
    default=None,
    help="tiff: JPEG-tiled pyramidal TIFF, any size (OpenSlide reads it); ome-zarr: NGFF multiscales; jpeg/png: small single-level images [tiff | seed jpeg].",
)
@click.option(
    "--background",
    type=click.Choice(["noise", "tissue"]),
    default=None,
    help="noise: the seed's blurred grey noise; tissue: pink/purple tissue on empty glass, markers on tissue [tissue | seed noise].",
)
@click.option(
    "--positive-fraction",
    type=float,
    default=None,
    help="Fraction of slides with label 1 (exact after rounding) [0.5].",
)
@click.option(
    "--markers-min", type=int, default=None, help="Fewest markers on a positive slide [1]."
)
@click.option(
    "--markers-max", type=int, default=None, help="Most markers on a positive slide [3 | seed 12]."
)
@click.option(
    "--marker-size-min",
    "--marker-size-min-px",
    "marker_size_min_px",
    type=int,
    default=None,
    help="Smallest marker extent in level-0 px, outline included [40 | seed 30].",
)
@click.option(
    "--marker-size-max",
    "--marker-size-max-px",
    "marker_size_max_px",
    type=int,
    default=None,
    help="Largest marker extent in level-0 px [120 | seed 140].",
)
@click.option(
    "--thickness-min",
    "--thickness-min-px",
    "thickness_min_px",
    type=int,
    default=None,
    help="Thinnest outline in px [2].",
)
@click.option(
    "--thickness-max",
    "--thickness-max-px",
    "thickness_max_px",
    type=int,
    default=None,
    help="Thickest outline in px [6 | seed 10].",
)
@click.option(
    "--filled-fraction",
    type=float,
    default=None,
    help="Probability that a marker is a solid shape instead of an outline [0].",
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="Level-0 microns per pixel written into the file (TIFF resolution tags, NGFF scale, JPEG/PNG dpi) [0.5].",
)
@click.option(
    "--tile-px",
    "--tile-size",
    "tile_px",
    type=int,
    default=None,
    help="TIFF tile / zarr chunk side in px, multiple of 16 [256].",
)
@click.option(
    "--jpeg-quality",
    type=int,
    default=None,
    help="JPEG quality 1..100 for TIFF tiles and JPEG files [90 | seed 95].",
)
@click.option(
    "--zarr-format",
    type=click.Choice(["2", "3"]),
    default=None,
    help="OME-Zarr store version: 3 (NGFF 0.5) or 2 (NGFF 0.4) [3].",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Random seed: same seed + options = same slides.",
)
@click.option(
    "--splits",
    default="",
    help="Fill the split column, stratified by label, e.g. train=0.6,val=0.2,test=0.2 (default: empty).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="CPUs to use (default: those this job may use). Several large slides are "
    "written at once, one per worker process; the tiles of one slide render in threads.",
)
def command(**kw: Any) -> None:
    from wsi_mil.config import SynthConfig
    from wsi_mil.synth import generate

    if kw.get("zarr_format") is not None:
        kw["zarr_format"] = int(kw["zarr_format"])
    entries = generate(SynthConfig(**kw), progress=progress_enabled())
    n_pos = sum(1 for e in entries if e.label == 1)
    click.echo(
        f"wrote {len(entries)} slides ({n_pos} positive) to {kw['out']}: slides.csv, markers.csv",
        err=True,
    )
