"""`wsi-mil extract`: patch stores -> encoder -> HDF5 feature stores (thin: parse, call extract_slides)."""

from __future__ import annotations

from pathlib import Path
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


@click.command(
    "extract",
    help="""Encode every patch of every slide's patch store into a feature store.

    \b
    reads   W/patches/<slide_id>.zarr            (from 'wsi-mil tile')
    writes  W/features/<encoder-tag>/<slide_id>.h5
            W/features/<encoder-tag>/encoder.json  (encoder metadata + resolved options)
            W/failures.csv                         (slides that failed, with the reason)

    The .h5 files have root datasets 'features' (N, D) and 'coords' (N, 2) level-0 px:
    CLAM's and TRIDENT's layout, so their tools read them. The encoder tag
    (e.g. resnet-patch-cnn-d128-1a2b3c4d) changes whenever the encoder, its options or
    its weights change. Slides whose output is current are skipped; outputs appear
    atomically; --shard I/N splits the slides over a job array.

    The default resnet-patch-cnn is UNTRAINED unless --weights is given: its features
    are a random-CNN baseline. Use --weights R/encoder.pt (from 'wsi-mil train --mode
    e2e') or --encoder timm:<model> (pip install -e '.[timm]' in the clone) for
    real features.

    On parallel file systems (Lustre, GPFS) set HDF5_USE_FILE_LOCKING=FALSE.
    """,
)
@config_option
@slide_inputs
@work_option
@click.option(
    "--encoder",
    default="resnet-patch-cnn",
    show_default=True,
    help="Encoder name: resnet-patch-cnn (the seed's ResNet) or timm:<model> (needs the timm extra; pretrained weights are downloaded by timm).",
)
@click.option(
    "--feature-dim",
    type=int,
    default=128,
    show_default=True,
    help="Output feature size of resnet-patch-cnn (an encoder.pt carries its own).",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Encoder weights: an encoder.pt from 'wsi-mil train --mode e2e' or a plain state_dict (.pt); loaded with torch.load(weights_only=True). Its SHA-256 goes into every store.",
)
@click.option(
    "--norm",
    type=click.Choice(["bn", "frozen-bn", "groupnorm"]),
    default="bn",
    show_default=True,
    help="Normalisation layers of resnet-patch-cnn (must match --weights; an encoder.pt carries "
    "its own). frozen-bn (train's name) is bn: extraction always uses BatchNorm's running "
    "statistics, so a top-level 'norm:' shared with 'wsi-mil train' works for both.",
)
@click.option(
    "--batch-size",
    type=int,
    default=64,
    show_default=True,
    help="Patches per encoder forward pass.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Threads decoding patches ahead of the encoder (0: decode in the main thread). Default: half the CPUs this job may use, 1..8.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto | cpu | cuda | cuda:N. auto: cuda when available (bf16 autocast, "
    "channels_last), else cpu.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Precision of the stored features (float16 halves the files).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Initialisation of an encoder without --weights (deterministic).",
)
@click.option(
    "--patches",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of <slide_id>.zarr patch stores. Default: W/patches.",
)
@click.option(
    "--features",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder. Default: W/features/<encoder-tag>.",
)
@click.option("--overwrite", is_flag=True, help="Extract again even when the output is current.")
@backend_option
@shard_option
def command(
    slide_paths: tuple[str, ...], slides_csv: str | None, shard: str | None, backend: str, **kw: Any
) -> None:
    from wsi_mil.config import ExtractConfig
    from wsi_mil.features import extract_slides

    run_slide_stage(ExtractConfig, extract_slides, slides_csv, slide_paths, shard, backend, kw)
