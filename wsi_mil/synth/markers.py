"""Slide specs: labels, splits and marker placement, all drawn from seeded generators."""

from __future__ import annotations

import math

import numpy as np

from wsi_mil.config import SynthConfig
from wsi_mil.errors import ConfigError
from wsi_mil.synth.render import COLOURS, SHAPES, Marker, SlideSpec, tissue_mask

_TRIES = 400  # placement attempts per marker
_REDRAWS = 20  # new random shapes/sizes tried for a marker that fits nowhere
_MAP_PX = 512  # longest side of the coarse tissue map candidates are drawn from


def assign_labels(n: int, positive_fraction: float, seed: int) -> list[int]:
    """Exactly round(n * positive_fraction) ones, in a seeded random order."""
    n_pos = int(round(n * positive_fraction))
    labels = np.array([1] * n_pos + [0] * (n - n_pos))
    np.random.default_rng([seed, 7001]).shuffle(labels)
    return [int(v) for v in labels]


def assign_splits(labels: list[int], fractions: dict[str, float], seed: int) -> list[str | None]:
    """Split names stratified by label (largest-remainder rounding per label); None without splits."""
    if not fractions:
        return [None] * len(labels)
    out: list[str | None] = [None] * len(labels)
    names = list(fractions)
    rng = np.random.default_rng([seed, 7002])
    for lab in sorted(set(labels)):
        idx = [i for i, v in enumerate(labels) if v == lab]
        rng.shuffle(idx)
        want = [fractions[n] * len(idx) for n in names]
        counts = [math.floor(w) for w in want]
        order = sorted(range(len(names)), key=lambda k: (counts[k] - want[k], k))
        for k in order[: len(idx) - sum(counts)]:
            counts[k] += 1
        pos = 0
        for name, c in zip(names, counts, strict=True):
            for i in idx[pos : pos + c]:
                out[i] = name
            pos += c
    return out


def _random_marker(rng: np.random.Generator, cfg: SynthConfig) -> Marker:
    """A marker centred at (0, 0): shape, size, angle, colour, thickness, fill."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    thickness = int(rng.integers(cfg.thickness_min_px, cfg.thickness_max_px + 1))
    filled = bool(rng.random() < cfg.filled_fraction)
    # size = outer extent (long axis, outline included); the geometry is its centre line
    size = float(rng.integers(cfg.marker_size_min_px, cfg.marker_size_max_px + 1))
    a = max(1.0, (size - (0 if filled else thickness)) / 2.0)
    if shape == "circle":
        b, angle = a, 0.0
    elif shape == "ellipse":
        b, angle = a * float(rng.uniform(0.4, 0.9)), float(rng.uniform(0.0, 180.0))
    else:
        b, angle = a * float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.0, 180.0))
    return Marker(
        shape, 0.0, 0.0, round(a, 2), round(b, 2), round(angle, 2), colour, thickness, filled
    )


def _at(m: Marker, cx: float, cy: float) -> Marker:
    return Marker(
        m.shape,
        round(cx, 2),
        round(cy, 2),
        m.size_a,
        m.size_b,
        m.angle_deg,
        m.colour,
        m.thickness_px,
        m.filled,
    )


def _inside_tissue(spec: SlideSpec, m: Marker) -> bool:
    """Every level-0 pixel of the marker's bbox is fully tissue (checked on 4-px footprints)."""
    x0, y0, x1, y1 = m.bbox
    step = 4
    mask = tissue_mask(spec, x0, y0, math.ceil((x1 - x0) / step), math.ceil((y1 - y0) / step), step)
    return bool(mask.min() >= 0.999)


def _overlaps(bb: tuple[int, int, int, int], others: list[Marker], gap: int = 4) -> bool:
    for o in others:
        ob = o.bbox
        if (
            bb[0] < ob[2] + gap
            and ob[0] < bb[2] + gap
            and bb[1] < ob[3] + gap
            and ob[1] < bb[3] + gap
        ):
            return True
    return False


def _find_place(
    spec: SlideSpec,
    proto: Marker,
    placed: list[Marker],
    cand: np.ndarray | None,
    d: int,
    rng: np.random.Generator,
) -> Marker | None:
    """``proto`` moved to a random valid centre (on tissue when ``cand``), or None.

    Prefers a centre whose bbox keeps clear of ``placed``; accepts an overlap only after
    half of the tries failed.
    """
    W, H = spec.width_px, spec.height_px
    best: Marker | None = None
    hx = (proto.bbox[2] - proto.bbox[0]) / 2 + 1
    hy = (proto.bbox[3] - proto.bbox[1]) / 2 + 1
    for attempt in range(_TRIES):
        if cand is not None:
            cx, cy = cand[int(rng.integers(len(cand)))] + rng.uniform(-d / 2, d / 2, size=2)
        else:
            cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        if not (hx <= cx <= W - hx and hy <= cy <= H - hy):
            continue
        m = _at(proto, float(cx), float(cy))
        x0, y0, x1, y1 = m.bbox
        if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
            continue
        if cand is not None and not _inside_tissue(spec, m):
            continue
        if _overlaps(m.bbox, placed) and attempt < _TRIES // 2:
            best = best or m
            continue
        return m
    return best


def place_markers(
    spec: SlideSpec, n: int, cfg: SynthConfig, rng: np.random.Generator
) -> tuple[Marker, ...]:
    """``n`` markers fully inside the slide (and fully on tissue for the tissue background).

    Markers avoid each other's bounding boxes when they can. Raises ConfigError when a
    marker cannot be placed (markers too big for the slide or its tissue).
    """
    W, H = spec.width_px, spec.height_px
    cand: np.ndarray | None = None
    d = 1  # px per coarse tissue-map cell
    if spec.background == "tissue":
        d = max(1, math.ceil(max(W, H) / _MAP_PX))
        coarse = tissue_mask(spec, 0, 0, math.ceil(W / d), math.ceil(H / d), d)
        ys, xs = np.nonzero(coarse >= 0.999)
        cand = np.stack([(xs + 0.5) * d, (ys + 0.5) * d], axis=1)
        if len(cand) == 0:
            raise ConfigError(
                f"slide {spec.slide_id}: no tissue to place markers on",
                "use another --seed, a bigger slide or --background noise",
            )
    placed: list[Marker] = []
    for _ in range(n):
        best: Marker | None = None
        for _redraw in range(_REDRAWS):
            # a marker that fits nowhere (tissue too thin for its size) is redrawn with a new
            # random shape and size before giving up
            proto = _random_marker(rng, cfg)
            best = _find_place(spec, proto, placed, cand, d, rng)
            if best is not None:
                break
        if best is None:
            raise ConfigError(
                f"slide {spec.slide_id}: cannot place a {proto.shape} of "
                f"{proto.bbox[2] - proto.bbox[0]} px fully inside "
                + ("tissue" if cand is not None else "the slide")
                + f" ({_REDRAWS} random shapes and sizes tried)",
                "lower --marker-size-max, make the slide bigger, or try another --seed",
            )
        placed.append(best)
    return tuple(placed)


def build_specs(cfg: SynthConfig) -> list[SlideSpec]:
    """One SlideSpec per slide for a *resolved* config (see seed.resolve_config)."""
    labels = assign_labels(cfg.n_slides, cfg.positive_fraction, cfg.seed)
    specs = []
    stem = "synthetic_" if cfg.preset == "seed" else "synth_"
    width = max(3, len(str(cfg.n_slides - 1))) if cfg.preset != "seed" else 0
    for i, label in enumerate(labels):
        rng = np.random.default_rng([cfg.seed, i])
        slide_seed = int(rng.integers(0, 2**31 - 1))
        tissue_scale = float(
            2 ** round(math.log2(min(max(min(cfg.width_px, cfg.height_px) / 4, 128), 8192)))
        )
        spec = SlideSpec(
            slide_id=f"{stem}{i:0{width}d}" if width else f"{stem}{i}",
            width_px=cfg.width_px,
            height_px=cfg.height_px,
            label=label,
            background=cfg.background,
            seed=slide_seed,
            brightness=round(float(rng.uniform(-10.0, 10.0)), 3)
            if cfg.background == "noise"
            else 0.0,
            tissue_scale_px=tissue_scale,
        )
        if label == 1:
            n = int(rng.integers(cfg.markers_min, cfg.markers_max + 1))
            spec = _with_markers(spec, place_markers(spec, n, cfg, rng))
        specs.append(spec)
    return specs


def _with_markers(spec: SlideSpec, markers: tuple[Marker, ...]) -> SlideSpec:
    import dataclasses

    return dataclasses.replace(spec, markers=markers)
