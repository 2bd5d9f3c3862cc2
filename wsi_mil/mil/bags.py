"""Bags for MIL: one slide's cached features, loaded once and kept in memory.

:func:`load_bags` reads every slide's feature store (ours, CLAM or TRIDENT layout via
:func:`wsi_mil.features.feature_store.open_features`) into float32 tensors, and checks what
would otherwise fail deep inside training: missing stores (skipped with one warning that
lists them), mixed feature widths, NaN/inf values, empty bags, labels that are not 0/1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.errors import ConfigError, DataError
from wsi_mil.features.feature_store import FeatureBag, find_feature_file, open_features
from wsi_mil.slides.table import SlideEntry

log = logging.getLogger(__name__)


@dataclass
class Bag:
    """One slide in memory. ``features`` (N, D) float32; ``norm_coords`` (N, 2) in [0, 1] or None."""

    slide_id: str
    label: int | None
    split: str | None
    features: torch.Tensor
    norm_coords: torch.Tensor | None
    coords: np.ndarray | None = None  # (N, 2) int64 level-0 (x, y)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    slide_path: Path | None = None
    level0_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def has_coords(self) -> bool:
        return self.norm_coords is not None


def bag_from_feature_bag(entry: SlideEntry, fb: FeatureBag) -> Bag:
    """Wrap a :class:`FeatureBag` as a :class:`Bag` after checking its values (shares memory)."""
    check_finite(fb.features, entry.slide_id, fb.path)
    if len(fb) == 0:
        raise DataError(
            f"{fb.path or entry.slide_id}: feature store of slide {entry.slide_id} has 0 patches"
        )
    nc = fb.norm_coords()
    return Bag(
        slide_id=entry.slide_id,
        label=entry.label,
        split=entry.split,
        features=torch.from_numpy(np.ascontiguousarray(fb.features, np.float32)),
        norm_coords=None if nc is None else torch.from_numpy(np.ascontiguousarray(nc)),
        coords=fb.coords,
        attrs=dict(fb.attrs),
        path=fb.path,
        slide_path=entry.path,
        level0_size=fb.level0_size,
    )


def check_finite(features: np.ndarray, slide_id: str, path: Path | None = None) -> None:
    """:class:`DataError` naming the slide when ``features`` hold NaN or inf."""
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise DataError(
            f"{path or slide_id}: features of slide {slide_id} contain NaN/inf in {bad} of {len(features)} patches",
            "re-extract this slide ('wsi-mil extract --overwrite', or the tool that wrote the file) or drop it from the slide table",
        )


def resolve_features_dir(
    work: str | os.PathLike, features: str | os.PathLike | None, cfg: Any
) -> Path:
    """``--features DIR`` if given, else ``W/features/<encoder-tag>`` for ``cfg``'s encoder."""
    if features:
        d = Path(features)
        if not d.is_dir():
            raise ConfigError(
                f"--features {d} is not a folder",
                "pass the folder that holds <slide_id>.h5 feature stores",
            )
        return d
    try:
        from wsi_mil.features.extract import default_features_dir
    except ImportError:  # the features stage is not installed/landed: no default location
        raise ConfigError(
            "no --features folder given", "pass --features DIR (a folder of <slide_id>.h5)"
        ) from None
    d = Path(default_features_dir(work, cfg))
    if not d.is_dir():
        root = Path(work) / "features"
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        hint = (
            f"found {', '.join(have)} under {root}: pass --features {root}/<one of them>, or the same encoder options as extract"
            if have
            else "run 'wsi-mil extract' first, or pass --features DIR"
        )
        raise ConfigError(f"feature folder {d} does not exist", hint)
    return d


def find_stores(
    entries: Sequence[SlideEntry], features_dir: Path
) -> tuple[list[tuple[SlideEntry, Path]], list[str]]:
    """(entries with their store path, slide ids without a store)."""
    found, missing = [], []
    for e in entries:
        p = find_feature_file(features_dir, e.slide_id)
        if p is None:
            missing.append(e.slide_id)
        else:
            found.append((e, p))
    return found, missing


def list_ids(ids: Sequence[str], n: int = 10) -> str:
    """The first ``n`` slide ids, comma-separated, with how many more there are."""
    more = f" ... (+{len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def warn_missing_stores(missing: Sequence[str], n: int, features_dir: Path) -> None:
    """One warning listing the slides (of ``n``) without a feature store, if any."""
    if missing:
        log.warning(
            "%d of %d slides have no feature store in %s and are skipped: %s",
            len(missing),
            n,
            features_dir,
            list_ids(missing),
        )


def load_bags(
    entries: Sequence[SlideEntry],
    features_dir: str | os.PathLike,
    require_labels: bool = True,
    progress: bool = True,
) -> list[Bag]:
    """Read every entry's feature store into memory, in ``entries`` order.

    Slides with no store, or a store of 0 patches (no tissue found), are skipped with one
    warning listing them (:class:`DataError` if none is left). Errors: a label that is not
    0/1 (or missing with ``require_labels``), NaN/inf features, or feature widths that
    differ between stores.
    """
    from tqdm.auto import tqdm

    features_dir = Path(features_dir)
    check_labels(entries, require=require_labels)
    found, missing = find_stores(entries, features_dir)
    warn_missing_stores(missing, len(entries), features_dir)
    if not found:
        raise DataError(
            f"none of the {len(entries)} slides has a feature store in {features_dir}",
            "run 'wsi-mil extract' for them, or pass the right --features DIR",
        )
    bags: list[Bag] = []
    empty: list[str] = []
    for e, p in tqdm(found, desc="load bags", unit="slide", disable=not progress, leave=False):
        fb = open_features(p)
        if len(fb) == 0:
            empty.append(e.slide_id)
            continue
        bags.append(bag_from_feature_bag(e, fb))
    if empty:
        log.warning(
            "%d slides have 0 patches (no tissue found) and are skipped: %s",
            len(empty),
            list_ids(empty),
        )
    if not bags:
        raise DataError(
            f"none of the {len(found)} feature stores in {features_dir} has patches",
            "re-tile with a lower --min-tissue, or --tissue none for all-foreground images",
        )
    check_dims(bags)
    return bags


def check_labels(entries: Iterable[SlideEntry], require: bool = True) -> None:
    """:class:`DataError` for labels other than 0/1 (and, with ``require``, missing ones)."""
    for e in entries:
        if e.label is None:
            if require:
                raise DataError(
                    f"slide {e.slide_id} has no label",
                    "give every training slide a 0/1 label in the slide table",
                )
            continue
        if e.label not in (0, 1):
            raise DataError(f"slide {e.slide_id} has label {e.label!r}", "labels must be 0 or 1")


def check_dims(bags: Sequence[Bag], expected: int | None = None) -> int:
    """The common feature width D; :class:`DataError` naming examples when stores differ."""
    by_dim: dict[int, list[str]] = {}
    for b in bags:
        by_dim.setdefault(b.dim, []).append(b.slide_id)
    if len(by_dim) > 1:
        parts = "; ".join(f"D={d}: {list_ids(ids, 3)}" for d, ids in sorted(by_dim.items()))
        raise DataError(
            f"feature stores of different widths in one run ({parts})",
            "use stores from one encoder (one --features folder)",
        )
    dim = next(iter(by_dim)) if by_dim else 0
    if expected is not None and by_dim and dim != expected:
        raise DataError(
            f"feature stores have D={dim} but the model was trained on D={expected}",
            "use the feature folder (encoder) the run was trained with",
        )
    return dim


def open_bag(entry: SlideEntry, path: Path) -> Bag:
    """One slide's bag (for prediction, one at a time)."""
    return bag_from_feature_bag(entry, open_features(path))
