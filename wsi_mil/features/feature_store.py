"""Feature store: ``W/features/<encoder-tag>/<slide_id>.h5`` — *contract* format.

Root datasets ``features`` float32 (N, D) and ``coords`` int64 (N, 2) (the
CLAM/TRIDENT layout); ``coords`` attrs ``patch_size``, ``patch_level``; root attrs
``encoder``, ``encoder_weights_sha256``, ``level0_width``, ``level0_height``,
``mpp``, ``downsample``, ``wsi_mil_version``. Files are written under a temporary
name and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsi_mil import __version__
from wsi_mil.batch import atomic_path
from wsi_mil.errors import StoreError


@dataclass
class FeatureBag:
    """One slide's cached features. ``coords`` is None for stores without coordinates."""

    features: np.ndarray  # (N, D) float32
    coords: np.ndarray | None  # (N, 2) int64 level-0 (x, y)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    level0_size: tuple[int, int] | None = None  # (width, height) px

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def norm_coords(self) -> np.ndarray | None:
        """(N, 2) float32 in [0, 1]: coords / level-0 (width, height); None without coords."""
        if self.coords is None:
            return None
        if self.level0_size is not None:
            wh = np.array(self.level0_size, np.float64)
        else:  # other tools' stores may lack slide size: use the extent of the patch grid
            ps = float(self.attrs.get("patch_size_level0", 0) or 0)
            wh = self.coords.max(axis=0).astype(np.float64) + max(ps, 1.0)
        return (self.coords / np.maximum(wh, 1.0)).astype(np.float32)


def write_features(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
    patch_size: int,
    patch_level: int,
    dtype: str = "float32",
) -> None:
    """Write a feature store atomically. ``features`` (N, D), ``coords`` (N, 2) level-0 px."""
    features = np.asarray(features)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if features.ndim != 2 or len(features) != len(coords):
        raise ValueError(f"features {features.shape} and coords {coords.shape} disagree")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features.astype(dtype), chunks=True if len(features) else None)
        c = f.create_dataset("coords", data=coords)
        c.attrs["patch_size"] = int(patch_size)
        c.attrs["patch_level"] = int(patch_level)
        for k, v in {**attrs, "wsi_mil_version": __version__}.items():
            f.attrs[k] = "" if v is None else v


def open_features(path: str | os.PathLike) -> FeatureBag:
    """Read one feature store (ours; CLAM/TRIDENT ``.h5`` layouts share the root datasets)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: feature store not found", "run 'wsi-mil extract' or pass --features DIR")
    try:
        with h5py.File(p, "r") as f:
            if "features" not in f:
                raise StoreError(f"{p}: no 'features' dataset", "expected CLAM/TRIDENT layout: root 'features' (N, D) and 'coords' (N, 2)")
            feats = np.asarray(f["features"][:], np.float32)
            coords = np.asarray(f["coords"][:], np.int64) if "coords" in f else None
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            if "coords" in f:
                attrs.update({f"coords_{k}": _plain(v) for k, v in f["coords"].attrs.items()})
    except StoreError:
        raise
    except OSError as e:
        raise StoreError(f"{p}: unreadable HDF5 file ({e})", "delete it and re-run 'wsi-mil extract'") from None
    if feats.ndim == 3 and feats.shape[0] == 1:  # some tools store (1, N, D)
        feats = feats[0]
    if coords is not None and coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    for k in ("mpp", "downsample", "encoder_weights_sha256"):
        if attrs.get(k) == "":  # HDF5 attrs cannot hold None; we write "" for "unknown"
            attrs[k] = None
    size = None
    if attrs.get("level0_width") and attrs.get("level0_height"):
        size = (int(attrs["level0_width"]), int(attrs["level0_height"]))
    return FeatureBag(feats, coords, attrs, p, size)


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
