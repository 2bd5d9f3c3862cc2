"""Synthetic MIL bags written as real HDF5 feature stores (shared by tests/mil and tests/train).

Negatives: every instance ~ N(0, I). Positives: the same, plus a few *key* instances drawn
from N(shift, I) at known grid positions. Coordinates are a regular level-0 patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_mil.features.feature_store import write_features

PATCH_PX = 256


@dataclass
class SynthBag:
    slide_id: str
    label: int
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64
    key: np.ndarray  # (N,) bool: instance from the shifted distribution


def make_bags(
    n_bags: int = 80,
    dim: int = 32,
    n_min: int = 50,
    n_max: int = 200,
    n_key: tuple[int, int] = (2, 5),
    shift: float = 1.6,
    shift_dims: int = 4,
    seed: int = 0,
) -> list[SynthBag]:
    """Half positive (alternating labels), bag sizes uniform in [n_min, n_max]."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(dim, np.float32)
    mu[:shift_dims] = shift
    bags = []
    for i in range(n_bags):
        n = int(rng.integers(n_min, n_max + 1))
        side = int(np.ceil(np.sqrt(n)))
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="xy"), -1).reshape(
            -1, 2
        )[:n]
        coords = (grid * PATCH_PX).astype(np.int64)
        feats = rng.standard_normal((n, dim)).astype(np.float32)
        key = np.zeros(n, bool)
        label = i % 2
        if label:
            k = int(rng.integers(n_key[0], n_key[1] + 1))
            idx = rng.choice(n, size=k, replace=False)
            feats[idx] += mu
            key[idx] = True
        bags.append(SynthBag(f"bag{i:03d}", label, feats, coords, key))
    return bags


def write_bags(bags: list[SynthBag], features_dir: Path, drop_coords: bool = False) -> Path:
    """One ``<slide_id>.h5`` per bag in ``features_dir`` (our feature-store layout)."""
    features_dir.mkdir(parents=True, exist_ok=True)
    for b in bags:
        side_px = int(b.coords.max() + PATCH_PX)
        attrs = {
            "encoder": "synthetic",
            "level0_width": side_px,
            "level0_height": side_px,
            "patch_size_level0": PATCH_PX,
            "slide_path": "",
        }
        write_features(features_dir / f"{b.slide_id}.h5", b.features, b.coords, attrs, PATCH_PX, 0)
    return features_dir


def write_table(bags: list[SynthBag], csv: Path, splits: list[str] | None = None) -> Path:
    """Slide table with empty paths (feature-store-only slides)."""
    df = pd.DataFrame(
        {
            "slide_id": [b.slide_id for b in bags],
            "path": ["" for _ in bags],
            "label": [b.label for b in bags],
            "split": splits if splits is not None else ["" for _ in bags],
        }
    )
    csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(csv, index=False)
    return csv
