"""`wsi-mil predict`: slide scores, metrics and attention of a trained run. Thin: parse, call predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from wsi_mil.cli.common import (
    config_option,
    debug_enabled,
    finish_batch,
    progress_enabled,
    shard_option,
    slide_inputs,
    work_option,
)


@click.command(
    "predict",
    help="""Score slides with a trained run and write its predictions and attention maps.

    \b
    R/predictions.csv        slide_id,label,prob,split
    R/metrics.json           AUC, accuracy, balanced accuracy, F1, sensitivity,
                             specificity per split and overall, with the threshold
    R/attention/<id>.h5      coords (N,2) level-0 xy + attention (N,) per slide
    R/plots/roc.png          ROC curves
                             (all four under --out-dir DIR instead of R when given)
    \b
    The split of a slide is the one it had in training (R/splits.csv), else the
    slide table's (with --out-dir, always the table's: another cohort). Slides without
    a feature store are skipped with a warning.

    \b
    Per slide, like the other per-slide stages: a slide whose attention file was made
    from the same checkpoint, feature (or patch) store, label and split is not scored
    again (its probability is read back; --overwrite scores it anyway); a slide that
    fails is logged in W/failures.csv and the others go on (exit 1). With --shard I/N
    (or a SLURM job array) each shard writes only its slides' attention files; one
    unsharded 'wsi-mil predict' afterwards collects predictions.csv and metrics.json
    without scoring again. predictions.csv and metrics.json cover the slides of the
    call (after --split).
    """,
)
@config_option
@slide_inputs
@work_option
@click.option(
    "--run",
    "-r",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/default"),
    show_default=True,
    help="Run folder written by 'wsi-mil train'.",
)
@click.option(
    "--features",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of <slide_id>.h5 feature stores. Default: W/features/<tag> of the run's "
    "encoder when --work is given (another cohort), else the folder the run was trained on.",
)
@click.option(
    "--checkpoint", default="best", show_default=True, help="best | last | PATH to a checkpoint."
)
@click.option(
    "--threshold",
    type=float,
    default=0.5,
    show_default=True,
    help="prob >= threshold is called positive (accuracy, F1, sensitivity, specificity).",
)
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default=None,
    help="Only slides of this split (default: all).",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option(
    "--attention/--no-attention",
    default=True,
    show_default=True,
    help="Write R/attention/<id>.h5 (needed by heatmap, reruns that skip current slides, --shard).",
)
@click.option(
    "--overwrite", is_flag=True, help="Score every slide again even when its output is current."
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write predictions.csv, metrics.json, plots/ and attention/ here instead of into the "
    "run folder (e.g. an external cohort, without replacing the run's own evaluation); "
    "'wsi-mil heatmap --run OUT_DIR' draws them. Command line only: 'wsi-mil run' and the "
    "Snakefile keep everything in the run folder.",
)
@shard_option
def command(
    slides_csv: str | None, slide_paths: tuple[str, ...], shard: str | None, **kw: Any
) -> None:
    from click.core import ParameterSource

    from wsi_mil.batch import parse_shard
    from wsi_mil.config import PredictConfig
    from wsi_mil.errors import ConfigError
    from wsi_mil.slides.table import read_slide_table
    from wsi_mil.train.predict import predict_slides

    if click.get_current_context().get_parameter_source("out_dir") == ParameterSource.DEFAULT_MAP:
        raise ConfigError(
            "out-dir in a config file: wsi-mil run, heatmap and the Snakefile would not follow it",
            "pass --out-dir on the command line for one-off scoring, or set run: instead",
        )
    kw["work"] = Path(kw["work"])
    cfg = PredictConfig(**kw)
    entries = read_slide_table(slides_csv, slide_paths)
    out = predict_slides(
        cfg, entries, parse_shard(shard), progress=progress_enabled(), debug=debug_enabled()
    )
    if out.metrics is not None:
        d = cfg.out_dir or cfg.run
        click.echo(f"predictions: {d / 'predictions.csv'}, metrics: {d / 'metrics.json'}", err=True)
    finish_batch(out.batch)
