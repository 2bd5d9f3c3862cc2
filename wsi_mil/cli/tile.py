"""`wsi-mil tile`: slides -> tissue mask + patch grid (+ pixels) (thin: parse, call tile_slides)."""

from __future__ import annotations

from typing import Any

import click

from wsi_mil.cli.common import (
    backend_option,
    config_option,
    run_slide_stage,
    shard_option,
    slide_inputs,
    work_option,
)
from wsi_mil.config import TileConfig


@click.command(
    "tile",
    help="""Find tissue, lay a patch grid over it and store the patches of every slide.

    \b
    writes  W/patches/<slide_id>.zarr   zarr v3 patch store: coords (N, 2) int64 level-0 x,y
                                        of each patch's top-left corner, pixels (N, P, P, 3)
                                        uint8 (unless --no-pixels), tissue (N,) fraction
            W/masks/<slide_id>.png      QC: thumbnail, tissue in green, kept patches in blue
            W/patches/<slide_id>.h5     with --clam-h5: CLAM/TRIDENT coords file
            W/patches/config.yaml       the resolved options of this run
            W/failures.csv              slides that failed, with the reason

    Tissue is found on a thumbnail (HSV saturation, Otsu threshold, morphology). Edge
    patches that run past the image are kept and padded white. Pixels are read
    tile-aligned: each native tile of the slide is decoded once, in --workers threads.
    Slides whose store is complete and was made from the same file with the same options
    are skipped; a changed slide or option (other than --compression) rebuilds it. Stores appear atomically, so a
    killed run never leaves one that looks complete: just run the command again.
    A slide without tissue gets an empty store and a warning (later stages skip it).
    """,
)
@config_option
@slide_inputs
@work_option
@click.option(
    "--patch-size",
    type=int,
    default=224,
    show_default=True,
    help="Patch side in px at the output resolution (--level or --mpp).",
)
@click.option(
    "--stride",
    type=int,
    default=None,
    help="Grid step in output px. Default: the patch size (no overlap).",
)
@click.option(
    "--level",
    type=int,
    default=None,
    help="Pyramid level to read (0 = full resolution). Exclusive with --mpp. Default: 0.",
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="Target resolution in microns per px: reads the level within --mpp-tolerance of it, "
    "else the nearest finer level and resizes. Needs the slide's mpp (or --slide-mpp).",
)
@click.option(
    "--mpp-tolerance",
    type=float,
    default=0.1,
    show_default=True,
    help="Relative difference up to which a level's mpp counts as the target's (no resize).",
)
@click.option(
    "--slide-mpp",
    type=float,
    default=None,
    help="Level-0 microns per px, overriding (or supplying) the file's value.",
)
@click.option(
    "--significant-bits",
    type=click.IntRange(8, 32),
    default=None,
    help="Bit depth of samples stored wider than 8 bits, e.g. 12 for 12-bit camera data in "
    "uint16 files that do not say so (their top 12 bits become the 8-bit pixels; without it "
    "the top 8 of 16 stored bits are kept and such images come out nearly black). Default: "
    "the file's OME SignificantBits, else the stored width.",
)
@click.option(
    "--tissue",
    type=click.Choice(["otsu", "none"]),
    default="otsu",
    show_default=True,
    help="otsu: Otsu threshold on a thumbnail of saturation (brightfield colour), darkness "
    "(grey brightfield) or brightness (fluorescence, dark background); none: the whole image "
    "is foreground (synthetic or pre-cropped images; every grid patch is kept).",
)
@click.option(
    "--min-tissue",
    type=float,
    default=0.1,
    show_default=True,
    help="Keep patches whose area is at least this fraction tissue (0..1; with --tissue otsu).",
)
@click.option(
    "--exclude-pen",
    metavar="COLOURS",
    default=TileConfig.exclude_pen,
    help="With --tissue otsu on brightfield colour slides: marker ink of these colours (and "
    "a margin around it) is not tissue; comma-separated from green, blue, black, or all. "
    "Off by default: blue also matches blue-toned haematoxylin and pale IHC counterstain, "
    "green matches trichrome's collagen, black matches anthracotic pigment; red ink is not "
    "recognised. Ink is found on glass and thinly over tissue. Check the QC images.",
)
@click.option(
    "--thumbnail-px",
    type=int,
    default=2048,
    show_default=True,
    help="Longest side of the thumbnail the tissue mask is computed on.",
)
@click.option(
    "--pixels/--no-pixels",
    default=True,
    show_default=True,
    help="Store patch pixels in the zarr store (else coords only; extract then reads the slide).",
)
@click.option(
    "--compression",
    type=click.Choice(["none", "zstd", "lz4"]),
    default=TileConfig.compression,
    show_default=True,
    help="Pixel compression, all lossless. none: raw pixels, fastest to write and to read "
    "back; zstd (level 1): smallest (JPEG-scanned tissue ~1.2x smaller than raw, glass much "
    "more) for ~45% more tiling CPU; lz4 (blosc): barely compresses tissue. Changing only "
    "this keeps existing stores (same pixels); --overwrite rebuilds them. bench/tile.py "
    "prints the size and speed of each.",
)
@click.option(
    "--clam-h5/--no-clam-h5",
    default=False,
    show_default=True,
    help="Also write CLAM's W/patches/<slide_id>.h5 (coords + patch_size/patch_level attrs) "
    "so CLAM's or TRIDENT's feature extractors can run on this tiling.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Tile-reading threads. Default: the CPUs this job may use (affinity, cgroup quota, "
    "SLURM_CPUS_PER_TASK), at most 8 per process: more threads stop helping, as part of "
    "each tile's work holds Python's GIL. With --processes, shared out among them.",
)
@click.option(
    "--processes",
    type=int,
    default=1,
    show_default=True,
    help="Slides tiled at once, each in its own process, the --workers threads shared out "
    "among them. For many small images (cell imaging, TMA cores), whose per-slide work "
    "(tissue mask, store) is mostly serial; a whole-slide image keeps its threads busy alone.",
)
@click.option("--overwrite", is_flag=True, help="Rebuild stores even when they are current.")
@backend_option
@shard_option
def command(
    slide_paths: tuple[str, ...], slides_csv: str | None, shard: str | None, backend: str, **kw: Any
) -> None:
    from wsi_mil.tiling import tile_slides

    run_slide_stage(TileConfig, tile_slides, slides_csv, slide_paths, shard, backend, kw)
