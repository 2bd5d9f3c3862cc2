"""`wsi-mil run --config X.yaml`: every stage in order (thin: parse, call run_pipeline)."""

from __future__ import annotations

import sys

import click

from wsi_mil.cli.common import _load_config


@click.command(
    "run",
    help="""Run the pipeline's stages in order from one YAML config.

    \b
    synth    only if the config has a 'synth:' section
    tile     W/patches/<id>.zarr
    extract  W/features/<tag>/<id>.h5 (skipped for 'mode: e2e' unless listed in --stages)
    train    R/ (checkpoints, metrics)
    predict  R/predictions.csv, R/metrics.json, R/attention/
    heatmap  R/heatmaps/<id>.png

    Each stage is 'wsi-mil <stage> --config X.yaml' run in this process, so the options
    and their merging are exactly those of the stage commands: top-level keys apply to
    every stage, a section named after a stage to that stage only. Stages skip work that
    is already current, so running again resumes. One line per stage says what happened
    and where the outputs are.

    Exit codes: 0 all stages clean; 1 some slides failed in some stage (the later stages
    still ran); 2 a stage stopped the run with a usage or configuration error.
    """,
)
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    is_eager=True,
    callback=_load_config,
    help="YAML config passed as --config to every stage (its 'run:' section may set --stages).",
)
@click.option(
    "--stages",
    default=None,
    metavar="LIST",
    help="Comma-separated stages to run (e.g. 'train,predict,heatmap'). Default: all that apply.",
)
@click.option("--dry-run", "-n", is_flag=True, help="Print the stages and outputs; run nothing.")
@click.pass_context
def command(
    ctx: click.Context, config_path: str, stages: str | list[str] | None, dry_run: bool
) -> None:
    from wsi_mil.workflow import plan_stages, run_pipeline, stage_output

    if isinstance(stages, str):
        stages = [s for s in stages.split(",") if s.strip()]
    root = ctx.find_root().obj or {}
    global_args = (
        ["-v"] * int(root.get("verbose", 0))
        + ["-q"] * int(root.get("quiet", 0))
        + (["--debug"] if root.get("debug") else [])
    )
    if dry_run:
        for s in plan_stages(config_path, stages):
            click.echo(
                f"[run] {s:<8} wsi-mil {s} --config {config_path}  -> {stage_output(s, config_path)}"
            )
        return
    code, _ = run_pipeline(config_path, stages, global_args)
    sys.exit(code)
