"""Training (cached features or end to end) and prediction.

``train(cfg, entries)`` dispatches on ``cfg.mode``: "cached" -> :func:`.cached.train_cached`,
"e2e" -> :func:`.e2e.train_e2e`. Prediction: ``wsi_mil.train.predict.predict(cfg, entries)``
(the submodule ``wsi_mil.train.predict``; a package-level re-export would be shadowed by it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_mil.errors import ConfigError

if TYPE_CHECKING:
    from wsi_mil.config import TrainConfig
    from wsi_mil.slides.table import SlideEntry

MODES = ("cached", "e2e")


def train(cfg: TrainConfig, entries: Sequence[SlideEntry], progress: bool = True) -> Path:
    """Train a run into ``cfg.run``; returns the run folder."""
    if cfg.mode == "cached":
        from wsi_mil.train.cached import train_cached

        return train_cached(cfg, entries, progress=progress)
    if cfg.mode == "e2e":
        try:
            from wsi_mil.train.e2e import train_e2e
        except ModuleNotFoundError as e:
            if e.name != "wsi_mil.train.e2e":
                raise
            raise ConfigError(
                "--mode e2e is not available in this installation", "use --mode cached"
            ) from None
        return train_e2e(cfg, entries, progress=progress)
    raise ConfigError(f"--mode {cfg.mode!r}", f"use one of: {', '.join(MODES)}")


__all__ = ["MODES", "train"]
