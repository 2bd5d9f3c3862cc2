"""`wsi-mil run` (not implemented yet)."""

from __future__ import annotations

import click

from wsi_mil.cli.common import config_option, not_implemented


@click.command("run", help="Not implemented yet.")
@config_option
def command(**kw: object) -> None:
    not_implemented("run")(**kw)
