"""``wsi-mil predict``: slide scores, metrics and attention maps from a trained run.

Writes into the run folder ``R/``: ``predictions.csv`` (slide_id,label,prob,split),
``metrics.json`` (per split and overall, with the threshold used), ``attention/<id>.h5``
(``coords`` int64 (N, 2) level-0 xy, ``attention`` float32 (N,) + slide attrs) and
``plots/roc.png``. Bags are read one at a time, so memory is one slide's N x D features.
A cached run's features come from ``--features``, else ``W/features/<tag>`` of a ``--work``
given (the run's extract folder tag: another cohort), else the folder the run recorded
(:func:`features_folder`).

A per-slide stage like tile and extract: slides whose attention file is current are not
scored again, ``--shard I/N`` scores a share of the slides, and a failing slide is
recorded in ``W/failures.csv`` while the others finish (:func:`predict_slides`).

An attention file is current when its probability was computed from the same checkpoint
and feature (or, end to end, patch) store: its JSON attr ``inputs``. The attrs that only
describe the slide (``label``, ``split``, ``slide_path``, ``significant_bits``) follow the
slide table and the stores without scoring again: a rerun rewrites them in a copy renamed
over the file. ``significant_bits`` (absent for 8-bit data) is the bit depth tiling read the
slide's wider samples with (``tile --significant-bits``), so heatmap draws the background
the way the patches were read.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import yaml

from wsi_mil.batch import (
    BatchResult,
    Busy,
    Skip,
    SlideWarning,
    atomic_path,
    file_fingerprint,
    make_output_dir,
    output_lock,
    remove_stale_tmps,
    run_per_slide,
    shard_items,
)
from wsi_mil.config import PredictConfig, TileConfig
from wsi_mil.errors import ConfigError, DataError, StoreError
from wsi_mil.features.feature_store import open_features, plain_attr
from wsi_mil.mil.bags import (
    Bag,
    bag_from_feature_bag,
    check_labels,
    find_stores,
    warn_missing_stores,
)
from wsi_mil.mil.model import PositionalAttentionMIL, model_from_checkpoint
from wsi_mil.slides.table import SlideEntry
from wsi_mil.tiling.patch_store import PatchStore
from wsi_mil.train.loop import load_checkpoint_file
from wsi_mil.train.metrics import binary_metrics

log = logging.getLogger(__name__)

PRED_COLUMNS = ["slide_id", "label", "prob", "split"]
#: keys that attention files of earlier versions recorded in ``inputs`` although they do not
#: change the probability; ignored when deciding whether a file is current
LEGACY_INPUT_KEYS = ("label", "split")
#: in :func:`predict_slides`'s wanted attrs: the attr must not be there (deleted if it is)
_ABSENT = object()
#: a slide where tile found no tissue (and warned): nothing to score, as training leaves it out
NO_PATCHES = "no patches (no tissue found): not scored"


def read_run_config(run: str | Path) -> dict[str, Any]:
    """The resolved training config ``R/config.yaml`` as a dict."""
    p = Path(run) / "config.yaml"
    if not p.is_file():
        raise StoreError(
            f"{run} is not a training run folder (no config.yaml)",
            "pass the --run folder 'wsi-mil train' wrote",
        )
    return yaml.safe_load(p.read_text()) or {}


def checkpoint_path(run: str | Path, which: str) -> Path:
    """``best`` | ``last`` -> ``R/checkpoints/<which>.pt``; anything else is a path."""
    if which in ("best", "last"):
        return Path(run) / "checkpoints" / f"{which}.pt"
    return Path(which)


def check_checkpoint_exists(run: str | Path, which: str, path: Path) -> None:
    """A usage error naming the fix when ``--checkpoint`` (``best``, ``last`` or a path) names
    no file: a run whose training ended before its first epoch has no checkpoints yet."""
    if path.is_file():
        return
    if which not in ("best", "last"):
        raise ConfigError(
            f"--checkpoint {path} not found",
            "pass --checkpoint best, last or the path of a checkpoint 'wsi-mil train' wrote",
        )
    others = sorted(p.stem for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
    if others:
        raise StoreError(f"{path} not found", f"pass --checkpoint {' or '.join(others)} or PATH")
    raise StoreError(
        f"{path} not found: the run has no checkpoint yet (training writes them when an "
        "epoch ends, and this one stopped or is still in its first)",
        f"train it first: wsi-mil train --run {run} ..., or pass --checkpoint PATH",
    )


def warn_if_unfinished(
    run: str | Path, run_cfg: dict[str, Any], which: str, ck: dict[str, Any]
) -> None:
    """Warn (once) when the run's training stopped before its configured epochs without an
    early stop: killed part-way or still running, so the checkpoint is of an unfinished model.
    Judged from ``last.pt`` (``best.pt`` may rightly be of an earlier epoch); a checkpoint
    given as a path is taken as chosen."""
    if which == "last":
        last: Any = ck
    elif which == "best":
        p = Path(run) / "checkpoints" / "last.pt"
        try:  # memory-mapped: only the few scalars read here come from disk
            last = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - absent or unreadable: nothing to tell
            return
    else:
        return
    try:
        epochs, done = int(run_cfg.get("epochs") or 0), int(last.get("epoch") or 0)
        stopped = bool((last.get("early_stopping") or {}).get("stopped"))
    except (AttributeError, TypeError, ValueError):
        return
    if 0 < done < epochs and not stopped:
        log.warning(
            "run %s stopped at epoch %d of %d without an early stop: its training was "
            "interrupted (or is still running), so these predictions are of an unfinished "
            "model (checkpoint %s of epoch %d). To finish it: wsi-mil train ... --run %s --resume",
            run,
            done,
            epochs,
            which,
            int(ck.get("epoch") or 0),
            run,
        )


#: the default of ``--work``: predict takes a work folder other than this one as given
_DEFAULT_WORK = PredictConfig().work


def features_folder(cfg: PredictConfig, run_cfg: dict[str, Any], run: Path) -> Path:
    """The feature folder a cached-mode predict reads: ``--features``; else, when ``--work W``
    is given and the run was trained on an extract folder ``.../features/<tag>``,
    ``W/features/<tag>`` (another cohort extracted with the run's encoder); else the folder
    the run recorded (see :func:`resolve_recorded_features`)."""
    if cfg.features:
        d = Path(cfg.features)
        if not d.is_dir():
            raise ConfigError(f"--features {d} is not a folder", "pass --features DIR")
        return d
    recorded = run_cfg.get("features")
    if not recorded:
        raise ConfigError(
            "no --features folder given and the run does not record one", "pass --features DIR"
        )
    tag = _encoder_tag_of(str(recorded), run_cfg)
    if tag and Path(cfg.work) != _DEFAULT_WORK:
        d = Path(cfg.work) / "features" / tag
        if not d.is_dir():
            hint = (
                f"run 'wsi-mil extract --work {cfg.work}' with the encoder options the run was "
                "trained with, or pass --features DIR"
            )
            if Path(str(recorded)).is_dir():  # e.g. --work given only for failures.csv
                hint += f" (the run's own: --features {recorded})"
            raise ConfigError(
                f"feature folder {d} does not exist (the run was trained on {tag} features)", hint
            )
        return d
    return resolve_recorded_features(str(recorded), run_cfg, run, tag)


def _encoder_tag_of(folder: str, run_cfg: dict[str, Any]) -> str | None:
    """``<tag>`` when ``folder`` is an extract folder ``.../features/<name>-d<D>-<8 hex>`` of
    the run's feature width D, else None (features made elsewhere, given with --features)."""
    p = Path(folder)
    dim = (run_cfg.get("model") or {}).get("in_dim")
    if p.parent.name != "features" or not re.fullmatch(rf".+-d{dim}-[0-9a-f]{{8}}", p.name):
        return None
    return p.name


def _train_cwd(run_cfg: dict[str, Any], run: Path) -> Path | None:
    """The folder train ran in, when the run's recorded (relative) ``run`` path says: the
    run folder ``a/b`` recorded as ``b`` was made from ``a``. None when it cannot tell."""
    rec = Path(str(run_cfg.get("run") or ""))
    n = len(rec.parts)
    if not n or rec.is_absolute() or ".." in rec.parts:
        return None
    for here in (Path(os.path.abspath(run)), Path(run).resolve()):
        if here.parts[-n:] == rec.parts and len(here.parts) > n:
            return here.parents[n - 1]
    return None


def resolve_recorded_features(
    value: str, run_cfg: dict[str, Any], run: Path, tag: str | None
) -> Path:
    """The feature folder the run's ``config.yaml`` records: as is when absolute; a relative
    one (runs of earlier versions recorded it as given to train) against the folder train ran
    in (:func:`_train_cwd`), else the current folder. A clear error when none exists."""
    tried = _recorded_candidates(value, run_cfg, run)
    for d in tried:
        if d.is_dir():
            return d
    where = f" (looked in {', '.join(str(d) for d in tried)})" if len(tried) > 1 else ""
    raise ConfigError(
        f"the feature folder the run was trained on, {value} (recorded in "
        f"{Path(run) / 'config.yaml'}), does not exist{where}",
        "pass --features DIR" + (f", or --work W to read W/features/{tag}" if tag else ""),
    )


def _recorded_candidates(value: str, run_cfg: dict[str, Any], run: Path) -> list[Path]:
    p = Path(value)
    if p.is_absolute():
        return [p]
    out = []
    cwd = _train_cwd(run_cfg, run)
    if cwd is not None:
        out.append(Path(os.path.normpath(cwd / p)))
    if p not in out:
        out.append(p)  # relative to the current folder
    return out


def trained_patch_size(
    ck: dict[str, Any], run_cfg: dict[str, Any], run: Path, work: str | Path
) -> int | None:
    """The patch size an e2e run was trained on: as its checkpoint records it, else (older
    checkpoints) that of one of its training patch stores (in ``work`` or the run's recorded
    work folder) whose content digest is the one the checkpoint recorded for it
    (``inputs``), so a store re-tiled since does not count. None when neither can tell."""
    from wsi_mil.features.extract import store_digest

    recorded = (ck.get("extra") or {}).get("patch_size")
    if recorded:
        return int(recorded)
    inputs = ck.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        return None
    folders = [Path(work) / "patches"]
    if run_cfg.get("work"):
        folders += [d / "patches" for d in _recorded_candidates(str(run_cfg["work"]), run_cfg, run)]
    for sid, digest in list(inputs.items())[:8]:
        for folder in folders:
            p = folder / f"{sid}.zarr"
            if not p.exists():
                continue
            try:
                store = PatchStore.open(p)
                if store_digest(store) == digest:
                    return int(store.patch_size)
            except Exception:  # noqa: BLE001 - unreadable: ask another store
                continue
    return None


def _store_root_attrs(store: Path) -> dict[str, Any] | None:
    """A patch store's attrs from its root ``zarr.json`` (no zarr machinery for a value or
    two); None when unreadable."""
    try:
        attrs = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def _patch_size(attrs: Mapping[str, Any]) -> int | None:
    """A patch store's ``patch_size`` attr, from its root ``attrs`` (None: unknown)."""
    try:
        return int(attrs["patch_size"])
    except (KeyError, TypeError, ValueError):
        return None


def _check_store_patch_size(store: Path, size: int | None, trained: int, run: Path) -> None:
    """DataError when patch store ``store`` holds ``size`` px patches, not ``trained``."""
    if size is not None and size != trained:
        raise DataError(
            f"{store} holds {size} px patches, the run {run} was trained on {trained} px patches",
            f"tile the slide with --patch-size {trained} (and the run's other tiling options)",
        )


def check_patch_sizes(
    attrs: Mapping[str, Mapping[str, Any]], folder: Path, trained: int, run: Path
) -> dict[str, int]:
    """e2e: slide_id -> patch size of its store in ``folder`` (``attrs``: slide_id -> the
    store's root attrs, every slide of the call, not one shard's); a usage error when no
    store has the run's patch size: a work folder tiled otherwise is one error, not N
    failures. Stores of another size among right ones fail their slide
    (:func:`_check_store_patch_size`)."""
    sizes = {sid: s for sid, a in attrs.items() if (s := _patch_size(a)) is not None}
    if sizes and trained not in sizes.values():
        raise DataError(
            f"the patch stores in {folder} hold {'/'.join(map(str, sorted(set(sizes.values()))))} "
            f"px patches, the run {run} was trained on {trained} px patches",
            f"tile the slides with --patch-size {trained} into a --work folder of their own",
        )
    return sizes


#: relative difference of two resolutions still taken as one: the tiler's ``--mpp`` tolerance
RESOLUTION_TOLERANCE = TileConfig().mpp_tolerance


@dataclass(frozen=True)
class Resolution:
    """The scale of a store's patches: ``mpp`` microns per patch px (the slide's level-0 mpp
    x downsample) and ``downsample`` level-0 px per patch px; None where unknown."""

    mpp: float | None = None
    downsample: float | None = None

    @classmethod
    def of_attrs(cls, attrs: Mapping[str, Any]) -> Resolution:
        """From a patch store's (``output_mpp``) or feature store's (``mpp`` x ``downsample``)
        attrs; stores of other tools (CLAM, TRIDENT) record neither: unknown."""
        ds = _positive(attrs.get("downsample"))
        mpp = _positive(attrs.get("output_mpp"))
        if mpp is None and ds is not None and (slide_mpp := _positive(attrs.get("mpp"))):
            mpp = slide_mpp * ds
        return cls(mpp, ds)

    @classmethod
    def of_checkpoint(cls, ck: dict[str, Any]) -> Resolution:
        """What a run was trained at (``extra["output_mpp"]``, ``extra["downsample"]``);
        checkpoints of earlier versions record neither: unknown."""
        extra = ck.get("extra") or {}
        return cls(_positive(extra.get("output_mpp")), _positive(extra.get("downsample")))

    def compared(self, trained: Resolution) -> tuple[str, float, float] | None:
        """(unit, ours, trained) of what both know: the mpp, else the downsample; None when
        nothing can be compared."""
        if self.mpp is not None and trained.mpp is not None:
            return "mpp", self.mpp, trained.mpp
        if self.downsample is not None and trained.downsample is not None:
            return "downsample", self.downsample, trained.downsample
        return None

    def matches(self, trained: Resolution) -> bool:
        """False only when a value both know differs by more than the tolerance."""
        c = self.compared(trained)
        return c is None or _close(c[1], c[2])


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):  # None, "" (HDF5's None), anything else
        return None
    return v if np.isfinite(v) and v > 0 else None


def _close(value: float, ref: float) -> bool:
    return abs(value / ref - 1.0) <= RESOLUTION_TOLERANCE


def _common(values: Sequence[float | None]) -> float | None:
    """The median of ``values`` when all are known and within the tolerance of it, else None."""
    known = [v for v in values if v is not None]
    if not known or len(known) < len(values):
        return None
    mid = float(np.median(known))
    return mid if all(_close(v, mid) for v in known) else None


def training_resolution(attrs: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """The checkpoint's ``extra`` entries ``output_mpp`` (microns per patch px) and
    ``downsample`` (level-0 px per patch px) the training stores (their ``attrs``) share;
    None where one is unknown or they disagree. Predict checks its stores against them."""
    res = [Resolution.of_attrs(a) for a in attrs]
    return {
        "output_mpp": _common([r.mpp for r in res]),
        "downsample": _common([r.downsample for r in res]),
    }


def store_resolution(store: Path) -> Resolution:
    """The resolution a patch store (``.zarr``) or HDF5 feature store records, from its
    metadata only; unknown for other files and unreadable stores."""
    if store.suffix == ".zarr":
        return Resolution.of_attrs(_store_root_attrs(store) or {})
    if store.suffix == ".h5":
        try:
            with h5py.File(store, "r") as f:
                return Resolution.of_attrs({k: plain_attr(f.attrs[k]) for k in f.attrs})
        except OSError:
            pass
    return Resolution()


def _describe(unit: str, values: Iterable[float]) -> str:
    """``0.25 microns/px`` or ``downsample 1 (...)``; several values joined by ``/``."""
    v = "/".join(dict.fromkeys(f"{x:.3g}" for x in sorted(values)))
    return f"{v} microns/px" if unit == "mpp" else f"downsample {v} (level-0 px per patch px)"


def _resolution_fix(unit: str, trained: float, e2e: bool, own_work: bool = False) -> str:
    """How to tile the slides at ``trained`` (2 significant digits: within the tolerance)."""
    how = (
        f"with --mpp {trained:.2g} (the run's resolution)"
        if unit == "mpp"
        else f"at the run's downsample {trained:.2g} (the --level of that downsample)"
    )
    where = " into a --work folder of their own" if own_work else ""
    return f"tile the slides {how}{where}" + ("" if e2e else ", then extract their features")


def _check_store_resolution(
    store: Path, res: Resolution, trained: Resolution, run: Path, e2e: bool
) -> None:
    """DataError when ``store`` holds patches at another resolution than the run's."""
    c = res.compared(trained)
    if c is not None and not _close(c[1], c[2]):
        unit, got, want = c
        raise DataError(
            f"{store} holds patches at {_describe(unit, [got])}, the run {run} was trained "
            f"at {_describe(unit, [want])}",
            _resolution_fix(unit, want, e2e),
        )


def check_resolutions(
    res: Mapping[str, Resolution], folder: Path, trained: Resolution, run: Path, e2e: bool
) -> dict[str, Resolution]:
    """``res`` (slide_id -> resolution of its store in ``folder``, all slides of the call,
    not one shard's) when some store that can be compared with the run's resolution matches
    it, else a usage error: a cohort tiled otherwise is one error, not N failures. Stores
    at another resolution among right ones fail their slide (:func:`_check_store_resolution`)."""
    compared = [c for r in res.values() if (c := r.compared(trained)) is not None]
    if compared and not any(_close(got, want) for _, got, want in compared):
        unit, want = compared[0][0], compared[0][2]
        got = [g for u, g, _ in compared if u == unit]
        raise DataError(
            f"the stores in {folder} hold patches at {_describe(unit, got)}, the run {run} "
            f"was trained at {_describe(unit, [want])}",
            _resolution_fix(unit, want, e2e, own_work=True),
        )
    return dict(res)


def read_run_splits(run: str | Path) -> dict[str, str]:
    """slide_id -> split the run trained/validated it in (``R/splits.csv``), if present."""
    p = Path(run) / "splits.csv"
    if not p.is_file():
        return {}
    with open(p, newline="") as fh:
        return {r["slide_id"]: r["split"] for r in csv.DictReader(fh)}


def _device(spec: str) -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {spec} but no CUDA device is visible", "use --device cpu or auto"
        )
    return torch.device(spec)


@torch.no_grad()
def predict_bag(
    model: PositionalAttentionMIL, bag: Bag, device: torch.device
) -> tuple[float, np.ndarray]:
    """(probability, attention (N,) float32) for one bag."""
    xy = bag.norm_coords.to(device) if bag.norm_coords is not None else None
    try:
        out = model(bag.features.to(device), xy)
    except DataError as e:
        raise DataError(f"slide {bag.slide_id}: {e.message}", e.hint) from None
    return float(torch.sigmoid(out.logit)), out.attention.float().cpu().numpy()


def write_attention(
    path: Path,
    bag: Bag,
    attention: np.ndarray,
    prob: float,
    split: str,
    entry: SlideEntry | None = None,
    inputs: dict[str, Any] | None = None,
    significant_bits: int | None = None,
) -> None:
    """``R/attention/<id>.h5`` in the agreed layout (see module doc), written atomically.

    ``entry``: its slide path (absolute) wins over the one the feature store recorded;
    ``inputs``: what the probability was computed from (JSON attr ``inputs``), so a rerun
    can tell whether the file is current; ``significant_bits``: the bit depth tiling read
    the slide with (attr written only when given), for heatmap's background."""
    coords = bag.coords if bag.coords is not None else np.full((len(bag), 2), -1, np.int64)
    ps0 = int(bag.attrs.get("patch_size_level0") or 0)
    if bag.level0_size is not None:
        w, h = bag.level0_size
    elif bag.coords is not None:
        w, h = (int(v) for v in bag.coords.max(axis=0) + ps0)
    else:
        w = h = 0
    slide_path = (entry.path if entry is not None else None) or bag.slide_path
    slide_path = slide_path or bag.attrs.get("slide_path") or ""
    if slide_path:  # absolute: heatmap may run from another folder
        slide_path = Path(slide_path).resolve()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f.create_dataset("attention", data=np.asarray(attention, np.float32))
        attrs = {
            "slide_id": bag.slide_id,
            "slide_path": str(slide_path),
            "patch_size_level0": ps0,
            "level0_width": int(w),
            "level0_height": int(h),
            "prob": float(prob),
            "label": -1 if bag.label is None else int(bag.label),
            "split": split or "",
            "has_coords": bag.coords is not None,
            "feature_store": str(bag.path or ""),
        }
        if inputs is not None:
            attrs["inputs"] = json.dumps(inputs, sort_keys=True)
        if significant_bits:
            attrs["significant_bits"] = int(significant_bits)
        for k, v in attrs.items():
            f.attrs[k] = v


def metrics_by_split(rows: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """{"splits": {split: metrics}, "overall": metrics} over labelled rows."""
    lab = [r for r in rows if r["label"] is not None]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in lab:
        by.setdefault(r["split"] or "none", []).append(r)

    def m(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return binary_metrics([r["label"] for r in rs], [r["prob"] for r in rs], threshold)

    return {
        "splits": {k: m(v) for k, v in sorted(by.items())},
        "overall": m(lab) if lab else None,
    }


@dataclass
class PredictOutcome:
    """What :func:`predict_slides` did: the per-slide batch and, when it collected them,
    the contents of ``metrics.json`` (None for one shard of several, or no scored slide)."""

    batch: BatchResult
    metrics: dict[str, Any] | None


def predict(
    cfg: PredictConfig, entries: Sequence[SlideEntry], progress: bool = True
) -> dict[str, Any]:
    """Score ``entries`` with run ``cfg.run`` (all of them, no shards); writes the files
    above and returns metrics.json's dict. Slides that fail are logged and recorded in
    ``W/failures.csv`` (see :func:`predict_slides` for the batch outcome)."""
    out = predict_slides(cfg, entries, progress=progress)
    if out.metrics is None:
        raise DataError(
            f"no slide could be scored: {out.batch.summary()}", "see W/failures.csv for why"
        )
    return out.metrics


def predict_slides(
    cfg: PredictConfig,
    entries: Sequence[SlideEntry],
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    debug: bool = False,
) -> PredictOutcome:
    """Score this shard's slides, one ``attention/<id>.h5`` each, then (unsharded) collect
    ``predictions.csv``, ``metrics.json`` and ``plots/roc.png`` over all of them; all in
    ``cfg.out_dir`` (default: the run folder ``R``).

    A slide whose attention file is complete and was made from the same checkpoint and
    feature (or patch) store is not scored again: its probability is read back, and its
    label, split and slide path attrs are brought up to date with the slide table, and its
    ``significant_bits`` with the patch store's, if they differ (no re-scoring, no
    re-encoding of patches). So shards of a job array score the
    slides, and one unsharded call afterwards collects the tables in seconds. A slide that
    fails is logged in ``W/failures.csv``; the others go on.
    """
    run = Path(cfg.run)
    run_cfg = read_run_config(run)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run
    if not 0.0 <= cfg.threshold <= 1.0:
        raise ConfigError(f"--threshold {cfg.threshold} is outside [0, 1]")
    if shard[1] > 1 and not cfg.attention:
        raise ConfigError(
            "--shard needs --attention: the shards' per-slide attention files are what a "
            "final unsharded 'wsi-mil predict' collects into predictions.csv",
            "drop --no-attention",
        )
    ck_path = checkpoint_path(run, cfg.checkpoint)
    check_checkpoint_exists(run, cfg.checkpoint, ck_path)
    # fingerprinted before it is read: a checkpoint replaced meanwhile is not taken for this one
    model_id = {"checkpoint": str(ck_path.resolve()), **(file_fingerprint(ck_path) or {})}
    ck = load_checkpoint_file(ck_path)
    warn_if_unfinished(run, run_cfg, cfg.checkpoint, ck)
    device = _device(cfg.device)
    model = model_from_checkpoint(ck).to(device).eval()
    check_labels(entries, require=False)

    # --out-dir scores another cohort: its slide ids may repeat the run's, but its slides
    # were never in the run's train/val splits
    run_splits = read_run_splits(run)
    if cfg.out_dir:
        seen = sorted(e.slide_id for e in entries if run_splits.get(e.slide_id) in ("train", "val"))
        if seen:
            log.warning(
                "--out-dir: %d slides share their id with the run's train/val slides (e.g. %s); "
                "they are scored as another cohort, with the slide table's split. To evaluate "
                "the run's own slides with their splits, predict into the run folder",
                len(seen),
                ", ".join(seen[:3]),
            )
        run_splits = {}
    split_of = {e.slide_id: run_splits.get(e.slide_id) or e.split or "" for e in entries}
    if cfg.split:
        entries = [e for e in entries if split_of[e.slide_id] == cfg.split]
        if not entries:
            raise ConfigError(
                f"no slide has split {cfg.split!r}", "check --split (train, val or test)"
            )
    mine = shard_items(list(entries), shard, key=lambda e: e.slide_id)

    e2e = run_cfg.get("mode", "cached") == "e2e"
    stores: dict[str, Path] = {}
    trained_ps: int | None = None  # e2e: the patch size the run was trained on, when known
    store_ps: dict[str, int] = {}  # e2e: slide_id -> patch size of its store
    trained_res = Resolution.of_checkpoint(ck)  # unknown for checkpoints of earlier versions
    store_res: dict[str, Resolution] = {}  # slide_id -> resolution of its store
    if e2e:
        from wsi_mil.train.e2e import E2EEncoder, patches_dir

        encoder: list[Any] = []  # made on first use: a rerun with nothing to score needs none
        pdir = patches_dir(cfg.work)
        for e in mine:
            stores[e.slide_id] = pdir / f"{e.slide_id}.zarr"
        # e2e training refuses patch stores of mixed sizes; the encoder would score any size
        trained_ps = trained_patch_size(ck, run_cfg, run, cfg.work)
        if trained_ps is not None or trained_res != Resolution():
            # every slide's root attrs, read once for both checks
            attrs = {
                e.slide_id: _store_root_attrs(pdir / f"{e.slide_id}.zarr") or {} for e in entries
            }
            if trained_ps is not None:
                store_ps = check_patch_sizes(attrs, pdir, trained_ps, run)
            if trained_res != Resolution():
                res = {sid: Resolution.of_attrs(a) for sid, a in attrs.items()}
                store_res = check_resolutions(res, pdir, trained_res, run, e2e)
    else:
        fdir = features_folder(cfg, run_cfg, run)
        # decided over all slides, not this shard's: whether a shard stops must not depend
        # on how the slide ids fall into shards
        found, missing = find_stores(entries, Path(fdir))
        if entries and not found:
            raise DataError(
                f"none of the {len(entries)} slides has a feature store in {fdir}",
                "pass the right --features DIR",
            )
        _check_folder_fits(model, found[0][1])  # a wrong folder: one error, not N failures
        if trained_res != Resolution():
            res = {e.slide_id: store_resolution(p) for e, p in found}
            store_res = check_resolutions(res, Path(fdir), trained_res, run, e2e)
        ours = {e.slide_id for e in mine}
        warn_missing_stores([m for m in missing if m in ours], len(mine), Path(fdir))
        stores = {e.slide_id: p for e, p in found if e.slide_id in ours}
        mine = [e for e in mine if e.slide_id in stores]

    def inputs_of(entry: SlideEntry) -> dict[str, Any]:
        """What the probability is computed from: the checkpoint (head, and the encoder of
        an e2e run) and the slide's feature store, or its patch store end to end. Not the
        label, split or slide path: they change no probability (see :func:`slide_attrs`)."""
        store = stores[entry.slide_id]
        # a patch store's root zarr.json is rewritten whenever the store is rebuilt
        fp = file_fingerprint(store / "zarr.json" if e2e else store) if store.exists() else None
        return {"model": model_id, "input": {"path": str(store.resolve()), **(fp or {})}}

    bits_of: dict[str, int | None] = {}

    def significant_bits(entry: SlideEntry) -> int | None:
        sid = entry.slide_id
        if sid not in bits_of:
            bits_of[sid] = tiling_significant_bits(stores[sid], sid, cfg.work, e2e)
        return bits_of[sid]

    def slide_attrs(entry: SlideEntry) -> dict[str, Any]:
        """The attention file's attrs that describe the slide, which a rerun updates in a
        current file. None: keep the recorded value (no slide path in the table);
        ``_ABSENT``: no such attr."""
        bits = significant_bits(entry)
        return {
            "label": -1 if entry.label is None else int(entry.label),
            "split": split_of.get(entry.slide_id, "") or "",
            "slide_path": str(Path(entry.path).resolve()) if entry.path else None,
            # unknown (no patch store to ask, e.g. purged from scratch): keep what is recorded
            "significant_bits": None if bits is None else (bits or _ABSENT),
        }

    probs: dict[str, float] = {}

    def one(entry: SlideEntry) -> None:
        out = out_dir / "attention" / f"{entry.slide_id}.h5"
        if not cfg.attention:
            score(entry, out)
            return
        with output_lock(out) as held:
            if not held:
                log.info("%s: another process is writing %s", entry.slide_id, out)
                raise Busy(entry.slide_id)
            score(entry, out)

    def score(entry: SlideEntry, out: Path) -> None:
        sid = entry.slide_id
        try:  # before reuse: a file scored from a store of another tiling is no better
            if e2e and trained_ps is not None:
                _check_store_patch_size(stores[sid], store_ps.get(sid), trained_ps, run)
            if sid in store_res:
                _check_store_resolution(stores[sid], store_res[sid], trained_res, run, e2e)
        except DataError:
            if cfg.attention:  # heatmap draws every file
                out.unlink(missing_ok=True)
            raise
        inputs = inputs_of(entry)
        if cfg.attention:
            if not cfg.overwrite:
                current = _read_current(out, inputs)
                if current is not None:
                    prob, recorded = current
                    changes = _changed_attrs(recorded, slide_attrs(entry))
                    if changes:
                        log.info(
                            "%s: probability current, updating %s", sid, ", ".join(sorted(changes))
                        )
                        remove_stale_tmps(out)  # of an update a crash interrupted
                        try:
                            _update_attrs(
                                out, {**changes, "inputs": json.dumps(inputs, sort_keys=True)}
                            )
                        except OSError as e:  # the probability stands; only attrs are old
                            log.warning(
                                "%s: could not update the attrs of %s (%s); its probability "
                                "is used, its attrs stay as they were",
                                sid,
                                out,
                                e,
                            )
                    probs[sid] = prob
                    raise Skip(sid)
            # an outdated file must not outlive a failure below (heatmap draws every file)
            out.unlink(missing_ok=True)
            remove_stale_tmps(out)
        if e2e:
            if stores[sid].exists() and len(PatchStore.open(stores[sid])) == 0:
                raise SlideWarning(NO_PATCHES)
            if not encoder:
                encoder.append(E2EEncoder(run, device, checkpoint=str(ck_path)))
            fb = encoder[0].encode(entry, cfg.work)
        else:
            fb = open_features(stores[sid])
        if len(fb) == 0:
            raise SlideWarning(NO_PATCHES)
        bag = bag_from_feature_bag(entry, fb)
        _check_bag_fits(model, bag)
        prob, att = predict_bag(model, bag, device)
        if cfg.attention:
            write_attention(
                out,
                bag,
                att,
                prob,
                split_of.get(sid, ""),
                entry=entry,
                inputs=inputs,
                significant_bits=significant_bits(entry) or None,
            )
        probs[sid] = prob

    # made once here: an --out-dir that cannot be a folder is one error, not one per slide
    make_output_dir(out_dir, "--out-dir" if cfg.out_dir else "--run")
    log.info("predict: %d slides (shard %d/%d) with %s", len(mine), shard[0], shard[1], ck_path)
    batch = run_per_slide(
        "predict",
        mine,
        one,
        cfg.work,
        slide_id=lambda e: e.slide_id,
        slide_path=lambda e: e.path,
        progress=progress,
        debug=debug,
    )
    if shard[1] > 1:
        log.info(
            "shard %d/%d: attention files written; run 'wsi-mil predict' without --shard "
            "afterwards to collect predictions.csv and metrics.json (scored slides are reused)",
            *shard,
        )
        return PredictOutcome(batch, None)
    rows = [
        {
            "slide_id": e.slide_id,
            "label": e.label,
            "prob": probs[e.slide_id],
            "split": split_of[e.slide_id],
        }
        for e in entries  # the slide table's order
        if e.slide_id in probs
    ]
    if not rows:  # tables of an earlier call would look current
        for name in ("predictions.csv", "metrics.json"):
            (out_dir / name).unlink(missing_ok=True)
        return PredictOutcome(batch, None)
    with atomic_path(out_dir / "predictions.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PRED_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {**r, "label": "" if r["label"] is None else r["label"], "prob": f"{r['prob']:.6f}"}
            )

    result = {
        "run": str(run),
        "checkpoint": str(ck_path),
        "epoch": int(ck.get("epoch", 0)),
        "threshold": float(cfg.threshold),
        "n_slides": len(rows),
        "n_labelled": sum(r["label"] is not None for r in rows),
        **metrics_by_split(rows, cfg.threshold),
    }
    with atomic_path(out_dir / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    _plot_roc(out_dir, rows)
    _log_summary(result)
    return PredictOutcome(batch, result)


def _check_fits(model: PositionalAttentionMIL, dim: int, has_coords: bool, what: str) -> None:
    """DataError when features of width ``dim`` (with/without coords) cannot go through ``model``."""
    if dim != model.in_dim:
        raise DataError(
            f"{what} has D={dim} features, the model was trained on D={model.in_dim}",
            "use the feature folder (encoder) the run was trained with",
        )
    if model.use_pos and not has_coords:
        raise DataError(
            f"{what} has no coordinates but the model uses the positional encoding",
            "use feature stores with coords, or train with --no-pos",
        )


def _check_bag_fits(model: PositionalAttentionMIL, bag: Bag) -> None:
    _check_fits(model, bag.dim, bag.has_coords, f"{bag.path}: slide {bag.slide_id}")


def _check_folder_fits(model: PositionalAttentionMIL, store: Path) -> None:
    """The check above on one HDF5 store of a feature folder, before the batch, from its
    metadata only (a store can be GBs): a folder of another encoder is one usage error, not
    a failure per slide. Anything else (``.pt``, other layouts, unreadable files) is left
    to each slide's own check."""
    if store.suffix != ".h5":
        return
    try:
        with h5py.File(store, "r") as f:
            feats = f.get("features")
            if not isinstance(feats, h5py.Dataset) or feats.ndim not in (2, 3):
                return
            dim, has_coords = int(feats.shape[-1]), isinstance(f.get("coords"), h5py.Dataset)
    except OSError:
        return
    if has_coords or not model.use_pos:
        _check_fits(model, dim, True, f"{store}: slide {store.stem}")
    # no coords here may still mean coords next door (CLAM pt_files + h5): not decided here


def _read_current(path: Path, inputs: dict[str, Any]) -> tuple[float, dict[str, Any]] | None:
    """(probability, attrs) of attention file ``path`` if its probability was computed from
    ``inputs``, else None. Files of earlier versions also recorded the slide's label and
    split in ``inputs``; those keys are left out of the comparison."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            recorded = json.loads(str(plain_attr(f.attrs.get("inputs", "null"))))
            if isinstance(recorded, dict):
                recorded = {k: v for k, v in recorded.items() if k not in LEGACY_INPUT_KEYS}
            if recorded != json.loads(json.dumps(inputs)):
                return None
            if not ("coords" in f and "attention" in f):
                return None
            attrs = {k: plain_attr(f.attrs[k]) for k in f.attrs}
            return float(attrs["prob"]), attrs
    except (OSError, KeyError, ValueError, TypeError):  # unreadable or too old: redo it
        return None


def _changed_attrs(recorded: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``wanted`` that ``recorded`` does not hold (None in ``wanted``: keep
    what is recorded; ``_ABSENT``: the attr must not be there)."""
    out: dict[str, Any] = {}
    for k, v in wanted.items():
        if v is None:
            continue
        if v is _ABSENT:
            if k in recorded:
                out[k] = v
        elif recorded.get(k) != v:
            out[k] = v
    return out


def _update_attrs(path: Path, attrs: dict[str, Any]) -> None:
    """Set ``attrs`` on attention file ``path`` without scoring again. A copy is changed and
    renamed over the file (the file is small: N coords and weights), so a crash leaves the
    old file or the new one, never one half updated; the caller holds its output lock."""
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            for k, v in attrs.items():
                if v is _ABSENT:
                    if k in f.attrs:
                        del f.attrs[k]
                else:
                    f.attrs[k] = v


def tiling_significant_bits(
    store: Path, slide_id: str, work: str | Path | None, e2e: bool
) -> int | None:
    """The bit depth ``tile --significant-bits`` read the slide's >8-bit samples with: N, 0
    when it was not given (the 8-bit default), None when no patch store tells (unknown).
    End to end, ``store`` is the patch store, which records it. A feature store: its own
    ``significant_bits`` attr if extract wrote one, else the patch store it was made from
    (attr ``source_store``), else ``W/patches/<id>.zarr``. Reads only small metadata files:
    it runs for every slide, current or not."""
    patch_store: Path | None = store if e2e else None
    if not e2e and store.suffix == ".h5":
        try:
            with h5py.File(store, "r") as f:
                if "significant_bits" in f.attrs:
                    return int(plain_attr(f.attrs["significant_bits"]) or 0)
                src = str(plain_attr(f.attrs.get("source_store", "")) or "")
        except (OSError, TypeError, ValueError):
            src = ""
        if src and Path(src).exists():
            patch_store = Path(src)
    if patch_store is None and work is not None:
        candidate = Path(work) / "patches" / f"{slide_id}.zarr"
        if candidate.exists():
            patch_store = candidate
    attrs = None if patch_store is None else _store_root_attrs(patch_store)
    if attrs is None:
        return None
    try:
        return int(attrs.get("significant_bits") or 0)
    except (TypeError, ValueError):
        return None


def _plot_roc(out_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    from wsi_mil.train.plots import plot_roc

    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        if r["label"] is None:
            continue
        for key in (r["split"] or "none", "all"):
            y, p = curves.setdefault(key, ([], []))
            y.append(int(r["label"]))
            p.append(float(r["prob"]))
    if len(curves) == 2:  # one split only: "all" is the same curve
        curves.pop("all")
    try:
        plot_roc(curves, out_dir / "plots" / "roc.png")
    except Exception as e:  # noqa: BLE001 - a plot must never fail prediction
        log.warning("could not draw %s: %s", out_dir / "plots" / "roc.png", e)


def _log_summary(result: dict[str, Any]) -> None:
    for name, m in result["splits"].items():
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        bal = "n/a" if m["balanced_accuracy"] is None else f"{m['balanced_accuracy']:.3f}"
        log.info(
            "%-5s n=%d  AUC %s  accuracy %.3f  balanced accuracy %s",
            name,
            m["n"],
            auc,
            m["accuracy"],
            bal,
        )
