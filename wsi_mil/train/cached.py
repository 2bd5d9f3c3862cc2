"""``wsi-mil train --mode cached``: train the MIL head on cached feature stores.

All bags are read once into memory (N x D float32 per slide), so an epoch costs only the
head's forward/backward passes. Writes the run folder ``R/``: ``config.yaml`` (resolved),
``splits.csv``, ``checkpoints/{last,best}.pt``, ``metrics.csv``, ``plots/training.png``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from wsi_mil.batch import atomic_path, available_cpus, file_fingerprint, params_digest
from wsi_mil.config import TrainConfig, save_resolved
from wsi_mil.errors import ConfigError, DataError
from wsi_mil.mil.bags import Bag, load_bags, resolve_features_dir
from wsi_mil.mil.model import PositionalAttentionMIL, feature_stats
from wsi_mil.slides.table import SlideEntry
from wsi_mil.train import distributed as dist_
from wsi_mil.train.loop import (
    RESUME_FIX,
    Trainer,
    check_resumable,
    load_checkpoint_file,
    seed_everything,
)
from wsi_mil.train.splits import TRAIN, VAL, assign_splits

log = logging.getLogger(__name__)


def select_splits(cfg: TrainConfig, entries: Sequence[SlideEntry]) -> dict[str, str]:
    """slide_id -> train | val | test for the labelled entries (unlabelled ones are left out)."""
    labelled = [e for e in entries if e.label is not None]
    unlabelled = [e.slide_id for e in entries if e.label is None]
    if unlabelled:
        log.info(
            "%d slides have no label and are not used for training: %s",
            len(unlabelled),
            ", ".join(unlabelled[:10]),
        )
    if not labelled:
        raise DataError("no slide in the table has a label", "training needs a 0/1 'label' column")
    return assign_splits(
        [e.slide_id for e in labelled],
        [int(e.label) for e in labelled],  # type: ignore[arg-type]
        [e.split for e in labelled],
        val_frac=cfg.val_frac,
        folds=cfg.folds,
        fold=cfg.fold,
        seed=cfg.seed,
    )


def check_train_classes(train: Sequence[Bag]) -> None:
    labels = {b.label for b in train}
    if len(train) == 0:
        raise DataError(
            "the training split is empty",
            "mark slides as train in the split column, or lower --val-frac",
        )
    if labels != {0, 1}:
        only = next(iter(labels))
        raise DataError(
            f"the training split has only label {only} ({len(train)} slide{'s' if len(train) != 1 else ''})",
            "a classifier needs both 0 and 1 slides in training; check the labels and the split column",
        )


#: what a run folder holds that comes from its model (train, predict, heatmap): files and
#: folders; ``--overwrite`` removes them all before training, so none of the previous
#: model's outputs stays behind looking current
RUN_OUTPUTS = (
    "checkpoints/last.pt",
    "checkpoints/best.pt",
    "metrics.csv",
    "encoder.pt",
    "plots/training.png",
    "plots/roc.png",
    "predictions.csv",
    "metrics.json",
    "localisation.json",
    "attention",
    "heatmaps",
)


def resolve_run_flags(cfg: TrainConfig) -> TrainConfig:
    """``--overwrite`` wins over ``--resume``: a config may keep ``resume: true`` for
    'wsi-mil run' to continue its run, so an ``--overwrite`` given with it (on the command
    line, or in the config for one run) is the deliberate choice (``--no-resume`` switches
    resuming off too)."""
    if cfg.resume and cfg.overwrite:
        if (Path(cfg.run) / "checkpoints" / "last.pt").exists():
            log.warning(
                "--overwrite and --resume both set: --overwrite wins, %s starts afresh and its "
                "checkpoints are removed (take 'overwrite' out of the config to resume it)",
                cfg.run,
            )
        return dataclasses.replace(cfg, resume=False)
    return cfg


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Refuse to overwrite a finished or running run unless --resume or --overwrite.

    ``--overwrite`` (without ``--resume``) first removes the previous run's
    :data:`RUN_OUTPUTS`: its checkpoints and everything predicted or drawn with them."""
    run = Path(cfg.run)
    last = run / "checkpoints" / "last.pt"
    if last.exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(
            f"run folder {run} already holds a run ({last})",
            "pass --resume to continue it, --overwrite to start afresh, or another --run",
        )
    if cfg.overwrite and not cfg.resume and is_run_dir(run):
        removed = remove_run_outputs(run, e2e=cfg.mode == "e2e")
        if removed:
            log.info("--overwrite: removed the previous run's %s", ", ".join(removed))
    run.mkdir(parents=True, exist_ok=True)
    return run


def is_run_dir(run: Path) -> bool:
    """Whether ``run`` holds a run written by 'wsi-mil train' (its config or checkpoints)."""
    return (run / "config.yaml").is_file() or (run / "checkpoints").is_dir()


#: files of these kinds in the run's attention/ and heatmaps/ folders are the model's outputs
_RUN_OUTPUT_SUFFIXES = {
    "attention": (".h5", ".lock"),
    "heatmaps": (".png", ".csv", ".json", ".yaml", ".lock"),
}


def remove_run_outputs(run: Path, e2e: bool = False) -> list[str]:
    """Delete :data:`RUN_OUTPUTS` of run folder ``run`` (``encoder.pt`` only for an ``e2e``
    run; in ``attention/`` and ``heatmaps/`` only the kinds of file predict and heatmap
    write, then the folder if empty); returns the names of those removed."""
    removed = []
    for name in RUN_OUTPUTS:
        p = run / name
        if name == "encoder.pt" and not e2e:
            continue
        if name in _RUN_OUTPUT_SUFFIXES:
            if p.is_dir() and not p.is_symlink():
                files = [f for f in p.rglob("*") if f.suffix in _RUN_OUTPUT_SUFFIXES[name]]
                for f in files:
                    f.unlink()
                for d in sorted((d for d in p.rglob("*") if d.is_dir()), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    p.rmdir()
                if files:
                    removed.append(f"{name}/ ({len(files)} files)")
        elif p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(name)
    return removed


#: options a resumed run may change: how long and where it runs, not what it learns from
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "overwrite",
        "epochs",
        "early_stop",
        "patience",
        "min_delta",
        "device",
        "work",
        "run",
        # the checkpoint's digests of the stores decide whether features changed; the
        # folder's path changes when a project moves
        "features",
    }
)


#: compared options holding paths (the others are in RESUMABLE_CHANGES): a relative and an
#: absolute spelling of one file are the same
_PATH_OPTIONS = ("weights",)


def _same_option(key: str, old: Any, new: Any) -> bool:
    """Whether a saved option equals the new one (paths compared as real paths: a run may
    have recorded one relative to the folder train ran in)."""
    if old == new:
        return True
    if key in _PATH_OPTIONS and isinstance(old, str) and isinstance(new, str):
        return os.path.realpath(old) == os.path.realpath(new)
    return False


def check_resume_options(cfg: TrainConfig, resolved: TrainConfig) -> None:
    """With ``--resume`` on a run that has a checkpoint, refuse options that differ from the
    run's ``config.yaml`` (other than :data:`RESUMABLE_CHANGES`), naming them: continuing
    would mix two trainings (or crash on other model shapes). Call it before ``config.yaml``
    is rewritten; every rank reads the same file, so all of them stop alike."""
    import yaml

    from wsi_mil.config import to_plain

    run = Path(cfg.run)
    saved = run / "config.yaml"
    if not (cfg.resume and (run / "checkpoints" / "last.pt").is_file() and saved.is_file()):
        return
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(to_plain(resolved))
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k.split(".")[0] not in RESUMABLE_CHANGES and not _same_option(k, old.get(k), new.get(k))
    ]
    if changed:
        shown = "; ".join(changed[:6]) + (
            f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
        )
        raise ConfigError(
            f"cannot resume {run}: it was trained with other options ({shown})",
            "use the run's options, start afresh with --overwrite (config: train: overwrite: "
            "true), or give another --run; 'wsi-mil run' resumes training by itself",
        )


def check_resume_checkpoint(
    cfg: TrainConfig,
    train: Sequence[Any],
    val: Sequence[Any],
    inputs: dict[str, str],
    kind: str = "feature stores",
) -> None:
    """With ``--resume`` on a run that has ``last.pt``: refuse, before anything in the run
    folder is rewritten, what :func:`wsi_mil.train.loop.check_resumable` refuses (other
    slides, changed input stores or labels, more epochs done than ``--epochs``).
    ``train``/``val``: the bags (``.slide_id``, ``.label``) of this run."""
    last = Path(cfg.run) / "checkpoints" / "last.pt"
    if not (cfg.resume and last.is_file()):
        return
    ck = load_checkpoint_file(last, fix=RESUME_FIX)
    labels = {b.slide_id: int(b.label) for b in [*train, *val]}
    train_ids, val_ids = [b.slide_id for b in train], [b.slide_id for b in val]
    check_resumable(ck, last, cfg.epochs, train_ids, val_ids, inputs, kind, labels)


#: feature-store attrs that say where things are, not what the features are
LOCATION_ATTRS = frozenset({"slide_id", "slide_path", "source_store", "coords_file"})


def feature_store_digest(bag: Bag) -> str:
    """Identity of the features of ``bag`` as read: the store's attrs (but paths) and shape.

    Stores of 'wsi-mil extract' record ``source_digest`` (patch store content) and the
    encoder's identity, exactly what extract decides currency by, so re-extracting the same
    patches gives the same digest. Other stores (CLAM, TRIDENT, hand-made) add their
    file's size and mtime.
    """
    attrs = {k: v for k, v in bag.attrs.items() if k not in LOCATION_ATTRS}
    ident: dict[str, object] = {"attrs": attrs, "shape": list(bag.features.shape)}
    if not attrs.get("source_digest") and bag.path is not None and bag.path.exists():
        ident["file"] = file_fingerprint(bag.path)
    return params_digest(ident)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class CachedTrainer(Trainer):
    """:class:`Trainer` on feature bags; its checkpoints record the resolution the stores
    were tiled at (``extra["output_mpp"]``, ``extra["downsample"]``): predict checks the
    stores it scores against it."""

    def extra_state(self) -> dict[str, Any]:
        from wsi_mil.train.predict import training_resolution

        return training_resolution(b.attrs for b in [*self.train_bags, *self.val_bags])


def write_splits_csv(path: Path, bags: Sequence[Bag], splits: dict[str, str]) -> None:
    """``R/splits.csv``: slide_id,label,split of every slide the run trained or validated on."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "split"])
        for b in bags:
            w.writerow([b.slide_id, b.label, splits[b.slide_id]])


def train_cached(cfg: TrainConfig, entries: Sequence[SlideEntry], progress: bool = True) -> Path:
    """Train the MIL head on cached features; returns the run folder ``R``.

    Reads ``<features>/<slide_id>.h5`` for every labelled slide of the train/val splits.
    """
    info = dist_.init_distributed(cfg.device)
    if info.device.type == "cpu":  # torch defaults to all cores, ignoring SLURM/cgroup limits
        torch.set_num_threads(max(1, min(torch.get_num_threads(), available_cpus())))
    try:
        return _train_cached(cfg, entries, info, progress)
    finally:
        dist_.cleanup(info)


def _train_cached(
    cfg: TrainConfig, entries: Sequence[SlideEntry], info: dist_.DistInfo, progress: bool
) -> Path:
    main = dist_.is_main(info)
    cfg = resolve_run_flags(cfg)
    splits = select_splits(cfg, entries)
    features_dir = resolve_features_dir(cfg.work, cfg.features, cfg)
    use = [e for e in entries if splits.get(e.slide_id) in (TRAIN, VAL)]
    bags = load_bags(use, features_dir, require_labels=True, progress=progress and main)
    train = [b for b in bags if splits[b.slide_id] == TRAIN]
    val = [b for b in bags if splits[b.slide_id] == VAL]
    check_train_classes(train)

    model_cfg = dataclasses.replace(cfg.model, in_dim=bags[0].dim)
    no_xy = [b.slide_id for b in bags if not b.has_coords]
    if model_cfg.use_pos and model_cfg.pos_dim > 0 and no_xy:
        log.warning(
            "%d feature stores have no coords (e.g. %s): positional encoding off",
            len(no_xy),
            no_xy[0],
        )
        model_cfg = dataclasses.replace(model_cfg, use_pos=False)
    # absolute: predict (and a resume) may run from another folder than train
    resolved = dataclasses.replace(cfg, features=features_dir.resolve(), model=model_cfg)

    run = Path(cfg.run)
    inputs = {b.slide_id: feature_store_digest(b) for b in bags}
    check_resume_options(cfg, resolved)
    check_resume_checkpoint(cfg, train, val, inputs, "feature stores")
    if main:
        run = prepare_run_dir(cfg)
        save_resolved(resolved, run / "config.yaml")
        write_splits_csv(run / "splits.csv", bags, splits)
    dist_.barrier(info)
    log.info(
        "training on %d slides (%d pos), validating on %d; D=%d, positional encoding %s",
        len(train),
        sum(b.label == 1 for b in train),
        len(val),
        model_cfg.in_dim,
        "on" if model_cfg.use_pos and model_cfg.pos_dim > 0 else "off",
    )

    seed_everything(cfg.seed)
    model = PositionalAttentionMIL(model_cfg)
    if model_cfg.feature_norm == "standard":
        model.set_feature_stats(*feature_stats(b.features for b in train))
    trainer = CachedTrainer(
        resolved, model, train, val, run, info=info, progress=progress, inputs=inputs
    )
    trainer.fit()
    if main:
        _plot_history(trainer, run)
    return run


def _plot_history(trainer: Trainer, run: Path) -> None:
    from wsi_mil.train.plots import plot_training_curves

    try:
        plot_training_curves(trainer.history, run / "plots" / "training.png")
    except Exception as e:  # noqa: BLE001 - a plot must never fail a finished training run
        log.warning("could not draw %s: %s", run / "plots" / "training.png", e)
