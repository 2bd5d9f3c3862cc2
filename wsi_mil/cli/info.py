"""`wsi-mil info SLIDE`: levels, dimensions, downsamples, mpp, backend, tile grid."""

from __future__ import annotations

import json
import logging
import math

import click

from wsi_mil.cli.common import backend_option, config_option

log = logging.getLogger(__name__)


class _InfoCommand(click.Command):
    """Reads the old ``--mpp`` (renamed ``--slide-mpp``) on the command line only, with a
    warning. It is no option of ``info``: a config file's ``mpp`` key (``tile``'s target
    resolution) must not reach ``info``, and config keys map to options by name."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        for k, a in enumerate(args):
            if a == "--":
                out += args[k:]
                break
            if a == "--mpp" or a.startswith("--mpp="):
                log.warning(
                    "'wsi-mil info --mpp' is deprecated: use --slide-mpp "
                    "(as in tile, where --mpp is the target resolution)"
                )
                a = "--slide-mpp" + a[len("--mpp") :]
            out.append(a)
        return super().parse_args(ctx, out)


@click.command("info", cls=_InfoCommand)
@click.argument("slide", type=str)
@click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table."
)
@click.option(
    "--slide-mpp",
    type=float,
    default=None,
    help="Level-0 microns per px, overriding (or supplying) the file's value.",
)
@backend_option
@config_option
def command(slide: str, as_json: bool, slide_mpp: float | None, backend: str) -> None:
    """Show SLIDE's levels, sizes, downsamples, mpp, reader backend and native tile grid.

    SLIDE is any supported file: SVS/NDPI/MRXS/SCN (OpenSlide), pyramidal TIFF or
    OME-TIFF, an OME-Zarr folder, or a plain JPEG/PNG/TIFF.
    """
    from wsi_mil.errors import ConfigError
    from wsi_mil.slides.info import format_info, slide_info

    if slide_mpp is not None and not (math.isfinite(slide_mpp) and slide_mpp > 0):
        raise ConfigError(
            f"--slide-mpp must be a number > 0, got {slide_mpp}", "e.g. 0.25 (40x) or 0.5 (20x)"
        )
    info = slide_info(slide, backend=None if backend == "auto" else backend, mpp=slide_mpp)
    click.echo(json.dumps(info, indent=2) if as_json else format_info(info))
