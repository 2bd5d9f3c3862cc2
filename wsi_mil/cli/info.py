"""`wsi-mil info SLIDE`: levels, dimensions, downsamples, mpp, backend, tile grid."""

from __future__ import annotations

import json

import click

from wsi_mil.cli.common import backend_option, config_option


@click.command("info")
@click.argument("slide", type=str)
@click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table."
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help="Level-0 microns per pixel to use instead of the file's value (for files without one).",
)
@backend_option
@config_option
def command(slide: str, as_json: bool, mpp: float | None, backend: str) -> None:
    """Show SLIDE's levels, sizes, downsamples, mpp, reader backend and native tile grid.

    SLIDE is any supported file: SVS/NDPI/MRXS/SCN (OpenSlide), pyramidal TIFF or
    OME-TIFF, an OME-Zarr folder, or a plain JPEG/PNG/TIFF.
    """
    from wsi_mil.slides.info import format_info, slide_info

    info = slide_info(slide, backend=None if backend == "auto" else backend, mpp=mpp)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))
