"""`wsi-mil train`: positional-attention MIL on cached features (or end to end). Thin: parse, call train."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from wsi_mil.cli.common import config_option, progress_enabled, slide_inputs, work_option


@click.command(
    "train",
    help="""Train the positional-attention MIL head on slide labels.

    \b
    --mode cached (default): on feature stores from 'wsi-mil extract' (bags are read
      once into memory); --mode e2e: encoder + head end to end on the patch stores.
    \b
    Writes into the run folder R (--run):
      R/config.yaml               the resolved options
      R/splits.csv                slide_id,label,split of the slides used
      R/checkpoints/last.pt       every epoch (with optimiser/scheduler/RNG state: --resume)
      R/checkpoints/best.pt       the best epoch by --early-stop
      R/metrics.csv               one row per epoch (train loss, val loss, val AUC ...)
      R/plots/training.png        loss and AUC curves
      R/encoder.pt                e2e: the trained encoder (for extract --weights)
    \b
    Splits: --folds K (stratified k-fold, --fold I validates) > a 'split' column naming
    val slides > --val-frac (stratified random share). 'test' slides never train.
    Same data + options + --seed give the same weights (on CPU).
    \b
    e2e from an untrained encoder: --norm frozen-bn (statistics calibrated and the output
    layer standardised on training patches before epoch 1), --freeze-encoder-epochs 3 and
    --encoder-lr 1e-4 (see configs/e2e-small.yaml); without them the loss can sit at ln 2.
    R/encoder.pt then feeds 'wsi-mil extract --weights R/encoder.pt'.
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
    help="Run folder to write.",
)
@click.option(
    "--mode",
    type=click.Choice(["cached", "e2e"]),
    default="cached",
    show_default=True,
    help="cached: head on cached features; e2e: encoder + head end to end.",
)
@click.option(
    "--features",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of <slide_id>.h5 feature stores (ours, CLAM or TRIDENT). Default: W/features/<encoder-tag> of --encoder/--feature-dim/--weights.",
)
@click.option(
    "--epochs", type=int, default=20, show_default=True, help="Passes over the training slides."
)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option(
    "--weight-decay", type=float, default=0.05, show_default=True, help="AdamW weight decay."
)
@click.option("--beta1", type=float, default=0.9, show_default=True, help="AdamW beta1.")
@click.option("--beta2", type=float, default=0.999, show_default=True, help="AdamW beta2.")
@click.option(
    "--scheduler",
    type=click.Choice(["cosine", "none"]),
    default="cosine",
    show_default=True,
    help="Learning-rate schedule over the epochs.",
)
@click.option(
    "--val-frac",
    type=float,
    default=0.2,
    show_default=True,
    help="Share of each class held out for validation when neither --folds nor a 'val' split is given (0: no validation).",
)
@click.option(
    "--folds",
    type=int,
    default=0,
    show_default=True,
    help="K > 1: stratified slide-level K-fold cross-validation (test slides stay out).",
)
@click.option(
    "--fold",
    type=int,
    default=0,
    show_default=True,
    help="With --folds K: which fold (0..K-1) validates.",
)
@click.option(
    "--early-stop",
    type=click.Choice(["val_loss", "val_auc", "none"]),
    default="val_loss",
    show_default=True,
    help="Metric that picks best.pt and stops training after --patience epochs without improvement.",
)
@click.option(
    "--patience",
    type=int,
    default=10,
    show_default=True,
    help="Epochs without improvement before stopping (0: never stop early).",
)
@click.option(
    "--min-delta",
    type=float,
    default=0.0,
    show_default=True,
    help="Smallest change that counts as an improvement.",
)
@click.option(
    "--bags-per-step",
    type=int,
    default=1,
    show_default=True,
    help="Slides per optimizer step (gradients averaged; per rank under torchrun).",
)
@click.option(
    "--resume/--no-resume",
    default=False,
    show_default=True,
    help="Continue the run in --run from checkpoints/last.pt exactly (weights, optimiser, "
    "scheduler, RNG, epoch); --no-resume overrides 'resume: true' in a config.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh even though --run already holds a run (wins over --resume): the old "
    "model's checkpoints, metrics, predictions, attention and heatmaps are removed first.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for splits, initialisation and slide order.",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option(
    "--pos/--no-pos",
    "use_pos",
    default=True,
    show_default=True,
    help="Learned positional encoding of patch coordinates (off automatically for stores without coords).",
)
@click.option(
    "--pos-dim",
    type=int,
    default=32,
    show_default=True,
    help="Positional encoding width (MLP 2 -> N -> N).",
)
@click.option(
    "--attn-dim", type=int, default=64, show_default=True, help="Attention MLP hidden width."
)
@click.option(
    "--hidden-dim", type=int, default=64, show_default=True, help="Classifier hidden width."
)
@click.option(
    "--gated/--no-gated",
    default=False,
    show_default=True,
    help="Gated attention (tanh * sigmoid) instead of the seed's tanh attention.",
)
@click.option(
    "--dropout",
    type=float,
    default=0.0,
    show_default=True,
    help="Dropout on patch embeddings and the classifier's hidden layer.",
)
@click.option(
    "--feature-norm",
    type=click.Choice(["standard", "none"]),
    default="standard",
    show_default=True,
    help="standard: z-score each feature dim with the mean/std of the training patches "
    "(fixed before training, saved in the checkpoint); none: raw features, as in the seed.",
)
@click.option(
    "--encoder",
    default="resnet-patch-cnn",
    show_default=True,
    help="Encoder (names the default feature folder; trained with --mode e2e).",
)
@click.option(
    "--feature-dim", type=int, default=128, show_default=True, help="Encoder output width."
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Encoder weights (encoder.pt or a state_dict).",
)
@click.option(
    "--encoder-lr",
    type=float,
    default=None,
    help="e2e: encoder learning rate (default: --lr / 10; the saved config has the value used).",
)
@click.option(
    "--chunk-size",
    type=int,
    default=64,
    show_default=True,
    help="e2e: patches per encoder chunk (memory: one chunk of activations + the N x D features).",
)
@click.option(
    "--max-patches-per-bag",
    type=int,
    default=None,
    help="e2e: train on a random subset of at most this many patches per slide, drawn anew each epoch (an approximation of the full-bag gradient for faster epochs; validation and predict use every patch).",
)
@click.option(
    "--freeze-encoder-epochs",
    type=int,
    default=0,
    show_default=True,
    help="e2e: train only the head for the first N epochs.",
)
@click.option(
    "--norm",
    type=click.Choice(["frozen-bn", "groupnorm"]),
    default="frozen-bn",
    show_default=True,
    help="e2e: encoder normalisation: BatchNorm with frozen (running) statistics, or GroupNorm.",
)
@click.option(
    "--encoder-width",
    type=int,
    default=None,
    help="e2e: stage widths W, 2W, 4W of an untrained resnet-patch-cnn (default 64: 64/128/256); smaller is faster on CPU.",
)
@click.option(
    "--augment/--no-augment",
    default=False,
    show_default=True,
    help="e2e: random flips/rotations of patches.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "openslide", "tiff", "zarr", "image"]),
    default="auto",
    show_default=True,
    help="e2e: slide reader for patch stores without pixels.",
)
def command(slides_csv: str | None, slide_paths: tuple[str, ...], **kw: Any) -> None:
    from wsi_mil.config import ModelConfig, TrainConfig
    from wsi_mil.slides.table import read_slide_table
    from wsi_mil.train import train

    model_keys = (
        "use_pos", "pos_dim", "attn_dim", "hidden_dim", "gated", "dropout", "feature_norm",
    )  # fmt: skip
    model = ModelConfig(**{k: kw.pop(k) for k in model_keys})
    kw["work"] = Path(kw["work"])
    kw["backend"] = None if kw["backend"] == "auto" else kw["backend"]
    if kw["resume"] and kw["overwrite"]:
        # the one typed on the command line beats one from the config (e.g. 'sbatch ...
        # --resume' after a time-out, with 'overwrite: true' left in the config); from the
        # same place, --overwrite wins (train.cached.resolve_run_flags)
        src = click.get_current_context().get_parameter_source
        typed = {k for k in ("resume", "overwrite") if src(k) is ParameterSource.COMMANDLINE}
        if typed == {"resume"}:
            kw["overwrite"] = False
        elif typed == {"overwrite"}:
            kw["resume"] = False
    cfg = TrainConfig(model=model, **kw)
    entries = read_slide_table(slides_csv, slide_paths)
    run = train(cfg, entries, progress=progress_enabled())
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        click.echo(f"run folder: {run}", err=True)
