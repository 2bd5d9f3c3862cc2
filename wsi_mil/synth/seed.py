"""Presets and option validation for ``wsi-mil synth``.

``seed`` reproduces the seed project's generator (``generate_synthetic_data.py``):
4096 x 4096 JPEGs named ``synthetic_<i>.jpg`` with a mid-grey background of
Gaussian-blurred uniform noise and a per-image brightness jitter; label-1 images get
1..max circle/ellipse/rectangle outlines of random size, position, orientation, colour
(red/blue/green/yellow) and outline width; label-0 images none; ``labels.csv``
(``filename,label``, no header). ``custom`` is the default: tissue-like pyramidal TIFFs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from wsi_mil.config import SynthConfig
from wsi_mil.errors import ConfigError
from wsi_mil.slides.table import SPLITS

FORMATS = ("tiff", "ome-zarr", "jpeg", "png")
BACKGROUNDS = ("noise", "tissue")
JPEG_MAX_SIDE_PX = 65_500  # libjpeg's limit
IMAGE_MAX_PIXELS = 400_000_000  # jpeg/png are built in memory: ~1.2 GB of RGB at most

PRESETS: dict[str, dict[str, Any]] = {
    "custom": dict(
        n_slides=8,
        width_px=8192,
        height_px=8192,
        format="tiff",
        background="tissue",
        positive_fraction=0.5,
        markers_min=1,
        markers_max=3,
        marker_size_min_px=40,
        marker_size_max_px=120,
        thickness_min_px=2,
        thickness_max_px=6,
        filled_fraction=0.0,
        mpp=0.5,
        tile_px=256,
        jpeg_quality=90,
        zarr_format=3,
    ),
    "seed": dict(
        n_slides=100,
        width_px=4096,
        height_px=4096,
        format="jpeg",
        background="noise",
        positive_fraction=0.5,
        markers_min=1,
        markers_max=12,  # the seed's sample image (synthetic_8.jpg) shows 11 markers
        marker_size_min_px=30,  # its markers span ~30..140 px
        marker_size_max_px=140,
        thickness_min_px=2,
        thickness_max_px=10,
        filled_fraction=0.0,
        mpp=0.5,
        tile_px=256,
        jpeg_quality=95,
        zarr_format=3,
    ),
}


def resolve_config(cfg: SynthConfig) -> SynthConfig:
    """Fill None fields from the preset and validate everything; raises ConfigError (exit 2)."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}", f"choose one of: {', '.join(PRESETS)}")
    values = {k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) is None}
    r = dataclasses.replace(cfg, **values)
    _validate(r)
    return r


def _validate(c: SynthConfig) -> None:
    def need(ok: bool, msg: str, hint: str) -> None:
        if not ok:
            raise ConfigError(msg, hint)

    need(
        c.format in FORMATS,
        f"unknown --format {c.format!r}",
        f"choose one of: {', '.join(FORMATS)}",
    )
    need(
        c.background in BACKGROUNDS,
        f"unknown --background {c.background!r}",
        f"choose one of: {', '.join(BACKGROUNDS)}",
    )
    need(
        c.n_slides >= 1, f"--n-slides must be >= 1 (got {c.n_slides})", "ask for at least one slide"
    )
    need(
        c.width_px >= 64 and c.height_px >= 64,
        f"slide size {c.width_px}x{c.height_px} px is too small",
        "use --width/--height of at least 64 px",
    )
    if c.format in ("jpeg", "png"):
        if c.format == "jpeg" and max(c.width_px, c.height_px) > JPEG_MAX_SIDE_PX:
            raise ConfigError(
                f"JPEG cannot hold {c.width_px}x{c.height_px} px (limit {JPEG_MAX_SIDE_PX} px a side)",
                "use --format tiff (pyramidal, any size) or --format ome-zarr",
            )
        if c.width_px * c.height_px > IMAGE_MAX_PIXELS:
            raise ConfigError(
                f"--format {c.format} builds the whole image in memory; {c.width_px}x{c.height_px} px "
                f"is over its {IMAGE_MAX_PIXELS // 1_000_000} MP limit",
                "use --format tiff (streamed tile by tile, any size) or --format ome-zarr",
            )
    need(
        0.0 <= c.positive_fraction <= 1.0,
        f"--positive-fraction must be in [0, 1] (got {c.positive_fraction})",
        "e.g. 0.5 for half positive slides",
    )
    need(
        1 <= c.markers_min <= c.markers_max,
        f"marker count range {c.markers_min}..{c.markers_max} is invalid",
        "need 1 <= --markers-min <= --markers-max",
    )
    need(
        4 <= c.marker_size_min_px <= c.marker_size_max_px,
        f"marker size range {c.marker_size_min_px}..{c.marker_size_max_px} px is invalid",
        "need 4 <= --marker-size-min <= --marker-size-max",
    )
    need(
        c.marker_size_max_px + c.thickness_max_px + 4 <= min(c.width_px, c.height_px),
        f"markers up to {c.marker_size_max_px} px do not fit in a {c.width_px}x{c.height_px} px slide",
        "lower --marker-size-max or make the slide bigger",
    )
    need(
        1 <= c.thickness_min_px <= c.thickness_max_px,
        f"outline thickness range {c.thickness_min_px}..{c.thickness_max_px} px is invalid",
        "need 1 <= --thickness-min <= --thickness-max",
    )
    need(
        0.0 <= c.filled_fraction <= 1.0,
        f"--filled-fraction must be in [0, 1] (got {c.filled_fraction})",
        "0 = outlines only, 1 = solid shapes only",
    )
    need(c.mpp > 0, f"--mpp must be > 0 (got {c.mpp})", "e.g. 0.25 (40x) or 0.5 (20x)")
    need(
        c.tile_px >= 16 and c.tile_px % 16 == 0,
        f"--tile-px must be a positive multiple of 16 (got {c.tile_px})",
        "TIFF tiles must be multiples of 16; 256 or 512 are usual",
    )
    need(
        1 <= c.jpeg_quality <= 100,
        f"--jpeg-quality must be 1..100 (got {c.jpeg_quality})",
        "e.g. 90",
    )
    need(
        c.zarr_format in (2, 3),
        f"--zarr-format must be 2 or 3 (got {c.zarr_format})",
        "3 = NGFF 0.5",
    )
    need(
        c.workers is None or c.workers >= 1,
        f"--workers must be >= 1 (got {c.workers})",
        "or omit it",
    )
    parse_splits(c.splits)


def parse_splits(spec: str) -> dict[str, float]:
    """``"train=0.6,val=0.2,test=0.2"`` -> {"train": 0.6, ...}; "" -> {} (fractions sum to 1)."""
    if not spec or not spec.strip():
        return {}
    hint = "write e.g. --splits train=0.6,val=0.2,test=0.2 (names train/val/test, fractions summing to 1)"
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, _, frac = part.partition("=")
        name = name.strip().lower()
        if name not in SPLITS or name in out:
            raise ConfigError(f"--splits: bad or repeated split name {name!r}", hint)
        try:
            f = float(frac)
        except ValueError:
            raise ConfigError(f"--splits: {part.strip()!r} has no number", hint) from None
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"--splits: fraction {f} for {name} is outside [0, 1]", hint)
        out[name] = f
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ConfigError(f"--splits fractions sum to {sum(out.values()):g}, not 1", hint)
    return out
