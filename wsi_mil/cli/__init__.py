"""``wsi-mil`` command line. One module per command; each only parses and calls the library."""

from __future__ import annotations

import logging
import sys
import traceback

import click

from wsi_mil import __version__
from wsi_mil.cli.common import debug_requested, global_options, setup_logging
from wsi_mil.errors import OUTPUT_PATHS, WsiMilError, output_hint, path_error


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="wsi-mil")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "-q", "--quiet", count=True, help="Less output: no progress bars, warnings and errors only."
)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int, debug: bool) -> None:
    """Multiple-instance learning on gigapixel images.

    \b
    Stages (each reads the previous stage's files only):
      synth    make synthetic slides with known markers
      info     show a slide's levels, sizes, mpp, backend
      tile     tissue mask + patch grid (+ pixels)   -> W/patches/<id>.zarr
      extract  patches -> encoder -> features        -> W/features/<tag>/<id>.h5
      train    positional-attention MIL (cached | e2e) -> R/
      predict  scores, metrics, attention            -> R/predictions.csv
      heatmap  attention overlays                    -> R/heatmaps/<id>.png
      run      all stages from one YAML config

    Exit codes: 0 all done, 1 some slides failed, 2 usage or configuration error.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(verbose=verbose, quiet=quiet, debug=debug)
    setup_logging(verbose, quiet)


def _register() -> None:
    from wsi_mil.cli import extract, heatmap, info, predict, run, synth, tile, train

    for mod in (synth, info, tile, extract, train, predict, heatmap, run):
        mod.command.params.extend(global_options())  # -v/-q/--debug after the command too
        cli.add_command(mod.command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps errors to exit codes, tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="wsi-mil", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except WsiMilError as e:
        if debug or debug_requested():
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        if debug or debug_requested():
            traceback.print_exc()
        # an output folder that cannot be made or written is bad input, not a bug
        command = next((a for a in args if a in cli.commands), None)
        err = path_error(e, output_hint(OUTPUT_PATHS.get(command or "")))
        if err is not None:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        logging.getLogger("wsi_mil").debug("unhandled", exc_info=True)
        click.echo(
            f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)",
            err=True,
        )
        sys.exit(1)
    sys.exit(0)
