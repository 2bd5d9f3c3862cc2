"""Stage configs: one dataclass per stage, defaults in one place.

A YAML config file (``--config FILE.yaml``) uses the commands' long option names
as keys. Top-level keys apply to every command; a section named after a command
(``tile:``, ``extract:``, ``train:`` ...) applies to that command only. Flags given
on the command line win over the file. Each stage writes the resolved config it
ran with beside its outputs (``save_resolved``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsi_mil.errors import ConfigError

COMMANDS = ("synth", "info", "tile", "extract", "train", "predict", "heatmap", "run")


def load_config_file(path: str | os.PathLike, command: str) -> dict[str, Any]:
    """Keys for ``command`` from a YAML file: top-level option values + the ``command`` section.

    A top-level key named after a command is that command's section only when its value is
    a mapping (or empty); otherwise it is an option value like any other top-level key
    (``run: out/run`` sets ``--run`` of train/predict/heatmap). Keys are returned in click's
    parameter style (``patch-size`` -> ``patch_size``); section keys win over top-level ones.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", "check the --config path")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of option names to values")
    out: dict[str, Any] = {}
    for k, v in data.items():
        if not _is_section(k, v):
            out[_norm(k)] = v
    section = data.get(command)
    if _is_section(command, section) and section:
        for k, v in section.items():
            out[_norm(k)] = v
    return out


def _is_section(key: Any, value: Any) -> bool:
    """A per-command section: a command's name holding a mapping (or nothing)."""
    return key in COMMANDS and (value is None or isinstance(value, dict))


def load_full_config(path: str | os.PathLike) -> dict[str, Any]:
    """The whole YAML mapping (used by ``wsi-mil run`` and the Snakefile)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", "check the --config path")
    return yaml.safe_load(p.read_text()) or {}


def _norm(key: str) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def to_plain(obj: Any) -> Any:
    """Dataclass/Path/tuple -> YAML-safe plain Python."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_resolved(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    from wsi_mil.batch import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}",
            f"known: {', '.join(sorted(names))}",
        )
    return cls(**d)


# ---------------------------------------------------------------------- stages
@dataclass
class SynthConfig:
    """`wsi-mil synth`. Fields left None take the preset's value (wsi_mil.synth.seed.PRESETS)."""

    out: Path = Path("synthetic")
    preset: str = "custom"  # custom | seed (the seed generator: 4096^2 noise JPEGs + labels.csv)
    n_slides: int | None = None
    width_px: int | None = None
    height_px: int | None = None
    format: str | None = None  # tiff | ome-zarr | jpeg | png
    background: str | None = None  # noise (seed) | tissue (with empty glass)
    positive_fraction: float | None = None
    markers_min: int | None = None  # markers per positive slide
    markers_max: int | None = None
    marker_size_min_px: int | None = None  # outer extent (diameter / long side)
    marker_size_max_px: int | None = None
    thickness_min_px: int | None = None  # outline width
    thickness_max_px: int | None = None
    filled_fraction: float | None = None  # probability that a marker is solid, not an outline
    mpp: float | None = None  # level-0 microns per pixel written into the file
    tile_px: int | None = None
    jpeg_quality: int | None = None
    zarr_format: int | None = None  # 3 (NGFF 0.5) | 2 (NGFF 0.4)
    seed: int = 0
    splits: str = (
        ""  # e.g. "train=0.6,val=0.2,test=0.2" (stratified by label); "": empty split column
    )
    workers: int | None = (
        None  # CPUs (slide processes x render threads); None: all this job may use
    )


@dataclass
class TileConfig:
    """`wsi-mil tile` (wsi_mil.tiling.tile_slides)."""

    work: Path = Path("work")
    patch_size: int = 224  # px at the output resolution
    stride: int | None = None  # px at the output resolution; None = patch_size
    level: int | None = None  # read this pyramid level ...
    mpp: float | None = None  # ... or this target resolution (microns per px); neither: level 0
    mpp_tolerance: float = 0.1  # relative; a level within it is used as-is, else resize
    slide_mpp: float | None = None  # override the slide's level-0 mpp
    significant_bits: int | None = None  # bit depth of >8-bit samples (12-bit camera data)
    tissue: str = "otsu"  # otsu | none
    min_tissue: float = 0.1  # min tissue fraction per patch (otsu)
    exclude_pen: str | None = None  # otsu, brightfield: ink not tissue: "green,blue,black"|all
    thumbnail_px: int = 2048  # longest side of the thumbnail tissue is computed on
    pixels: bool = True  # store pixels (else coords only; later stages read the slide)
    compression: str = "none"  # lossless: none (fastest) | zstd (smallest) | lz4; see --help
    clam_h5: bool = False  # also write CLAM's W/patches/<slide_id>.h5 coords file
    workers: int | None = None  # read threads; None: CPUs this job may use
    processes: int = 1  # slides tiled at once, one per process (many small images)
    backend: str | None = None
    overwrite: bool = False  # rebuild even when the store is current


@dataclass
class ExtractConfig:
    work: Path = Path("work")
    encoder: str = "resnet-patch-cnn"
    feature_dim: int = 128
    weights: Path | None = None
    norm: str = "bn"  # bn | groupnorm (must match the weights)
    batch_size: int = 64
    workers: int | None = None  # patch-reading threads; None: from the CPUs this job may use
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # stored features: float32 | float16
    seed: int = 0  # initialisation of an untrained encoder
    backend: str | None = None
    patches: Path | None = None  # folder of <slide_id>.zarr patch stores; None: W/patches
    features: Path | None = None  # output folder; None: W/features/<encoder-tag>
    overwrite: bool = False  # recompute even when the output is current


@dataclass
class ModelConfig:
    """The MIL head (wsi_mil.mil.model.PositionalAttentionMIL); defaults = the seed's."""

    in_dim: int = 128  # patch feature width D (set from the feature stores at training time)
    pos_dim: int = 32  # learned positional encoding width (MLP 2 -> pos_dim -> pos_dim; 0 = off)
    attn_dim: int = 64  # attention MLP hidden width
    hidden_dim: int = 64  # classifier hidden width
    gated: bool = False  # gated attention (Ilse et al. 2018) instead of the seed's tanh MLP
    dropout: float = 0.0  # on the patch embeddings and the classifier's hidden layer
    use_pos: bool = True  # off automatically when a feature store has no coords
    feature_norm: str = "standard"  # standard: z-score features with training-set stats | none


@dataclass
class TrainConfig:
    work: Path = Path("work")
    run: Path = Path("runs/default")
    mode: str = "cached"  # cached | e2e
    features: Path | None = None  # folder of <slide_id>.h5; default W/features/<encoder-tag>
    encoder: str = "resnet-patch-cnn"
    feature_dim: int = 128
    weights: Path | None = None
    epochs: int = 20
    lr: float = 1e-3
    encoder_lr: float | None = None  # e2e: None = lr / 10 (train.e2e.resolve_encoder_lr)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    scheduler: str = "cosine"  # cosine | none
    val_frac: float = 0.2
    folds: int = 0  # >1: stratified k-fold; fold picks which
    fold: int = 0
    early_stop: str = "val_loss"  # val_loss | val_auc | none
    patience: int = 10
    min_delta: float = 0.0  # improvement needed to reset early-stopping patience
    bags_per_step: int = 1  # bags per optimizer step (summed over ranks with torchrun)
    resume: bool = False
    overwrite: bool = False  # start afresh in a run folder that already holds a run
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    # end-to-end only
    chunk_size: int = 64
    max_patches_per_bag: int | None = None
    freeze_encoder_epochs: int = 0
    norm: str = "frozen-bn"  # frozen-bn | groupnorm
    augment: bool = False
    encoder_width: int | None = None  # resnet-patch-cnn stage widths (w, 2w, 4w); None = 64
    backend: str | None = None

    def __post_init__(self) -> None:
        # AdamW's own checks, as usage errors (exit 2) before any data is read
        default = {f.name: f.default for f in dataclasses.fields(self)}
        for name, low, high in (
            ("lr", 0, None),
            ("weight_decay", 0, None),
            ("beta1", 0, 1),
            ("beta2", 0, 1),
        ):
            v, flag = getattr(self, name), "--" + name.replace("_", "-")
            if not (float(v) >= low and (high is None or float(v) < high)):
                bound = f"must be >= {low}" if high is None else f"is outside [{low}, {high})"
                raise ConfigError(f"{flag} {v} {bound}", f"e.g. {flag} {default[name]}")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(
                f"--folds {self.folds}: k-fold cross-validation needs at least 2 folds",
                "use --folds K with K >= 2, or --folds 0 (no cross-validation)",
            )
        for name in ("patience", "min_delta"):
            v, flag = getattr(self, name), "--" + name.replace("_", "-")
            if float(v) < 0:
                raise ConfigError(f"{flag} {v} must be >= 0", f"e.g. {flag} {default[name]}")


@dataclass
class PredictConfig:
    work: Path = Path("work")
    run: Path = Path("runs/default")
    features: Path | None = None
    checkpoint: str = "best"  # best | last | PATH
    threshold: float = 0.5  # prob >= threshold -> predicted positive
    split: str | None = None  # only slides of this split; None = all
    device: str = "auto"
    attention: bool = True  # write R/attention/<slide_id>.h5 (also what reruns and shards reuse)
    overwrite: bool = False  # score every slide again even when its attention file is current
    out_dir: Path | None = None  # where predictions/metrics/attention go; None = the run folder


@dataclass
class HeatmapConfig:
    """`wsi-mil heatmap` (wsi_mil.viz.make_heatmaps)."""

    run: Path = Path("runs/default")
    slide_id: str | None = None  # only this slide; None = every R/attention/<id>.h5
    style: str = "boxes"  # boxes (the seed's blue boxes) | smooth | both
    thumbnail_px: int = 2048  # longest side of the drawn thumbnail
    top_k: int = 8  # most-attended patches in R/heatmaps/<id>_topk.png; 0 = none
    max_alpha: float = 0.85  # opacity of the most-attended patch (boxes and smooth)
    scale: str = "max"  # attention -> [0, 1]: max (the seed's a / max a) | minmax | rank
    markers: Path | None = None  # markers.csv; None: next to --slides, else the slide's folder
    slides: Path | None = None  # slide table overriding the slide paths in the attention files
    work: Path | None = None  # where failures.csv goes; None = the run folder
    backend: str | None = None
    processes: int = 1  # slides drawn at once, one per process
    overwrite: bool = False  # redraw even when the PNGs are current
