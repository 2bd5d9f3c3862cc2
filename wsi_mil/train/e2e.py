"""End-to-end training of encoder + MIL head on patch stores (``wsi-mil train --mode e2e``).

Each bag (one slide, up to 10^5..10^6 patches) takes one streamed two-pass step
(:func:`wsi_mil.train.chunked.chunked_bag_step`): memory is one chunk of encoder activations
plus the (N, D) features, whatever N is. Pixels come from the patch store ``W/patches/<id>.zarr``
or, for coords-only stores, from the slide.

Semantics shared with cached training: bags of an epoch in the order
``epoch_permutation(n, seed, epoch)``, cut into groups of ``bags_per_step * world_size``; each
rank backprops the sum of its bags' losses / group size, gradients are all-reduced (SUM) and
every rank takes the same AdamW step. Every random draw (patch sampling, augmentation,
dropout) is a pure function of (seed, epoch, bag), so a run killed and resumed from
``checkpoints/last.pt`` continues exactly as if it had not been interrupted.

Options: ``chunk_size`` (patches per encoder chunk), ``max_patches_per_bag`` (a random subset
of each training bag per epoch — an approximation of the full-bag gradient, faster epochs;
validation and prediction always use every patch), ``freeze_encoder_epochs`` (head only for the
first K epochs: one forward pass, no re-encoding), ``encoder_lr`` (own AdamW param group),
``norm`` (``frozen-bn``: BatchNorm layers in eval mode while training, their running statistics
calibrated once on training patches when the encoder is untrained; ``groupnorm``), ``augment``
(random dihedral flips/rotations + per-channel affine colour jitter, replayed in pass 2).
On CUDA: bf16 autocast and channels_last.

Outputs in ``R/`` (through :class:`wsi_mil.train.loop.Trainer`, as cached runs): ``config.yaml``
(``mode: e2e``), ``splits.csv``, ``checkpoints/last.pt`` + ``best.pt`` (head under ``model`` /
``model_config``, encoder state under ``extra["encoder"]``; ``torch.load(weights_only=True)``),
``metrics.csv``, ``plots/training.png`` and ``encoder.pt`` (``{"encoder", "kwargs",
"state_dict"}`` of the best epoch, usable with ``wsi-mil extract --weights``).
A run killed at any point resumes with ``--resume`` from the last finished epoch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from wsi_mil.batch import atomic_path
from wsi_mil.config import ModelConfig, TrainConfig, save_resolved, to_plain
from wsi_mil.errors import ConfigError, DataError, StoreError
from wsi_mil.features.encoders import create_encoder, preprocess
from wsi_mil.features.feature_store import FeatureBag
from wsi_mil.mil.bags import list_ids
from wsi_mil.mil.model import feature_stats
from wsi_mil.slides.table import SlideEntry
from wsi_mil.tiling.patch_store import PatchStore
from wsi_mil.train import distributed as dist_
from wsi_mil.train.chunked import (
    chunk_seed,
    chunked_bag_step,
    encode_bag,
    freeze_batchnorm,
)
from wsi_mil.train.loop import Trainer, load_checkpoint_file, seed_everything

log = logging.getLogger(__name__)

NORM_OPTIONS = ("frozen-bn", "groupnorm")


# ---------------------------------------------------------------- bags of patches
@dataclass
class PatchBag:
    """One slide's patch store as a training bag (pixels are read lazily, chunk by chunk)."""

    entry: SlideEntry
    store: PatchStore
    index: int = 0  # position in its split (seeds patch sampling and augmentation)

    @property
    def slide_id(self) -> str:
        return self.entry.slide_id

    @property
    def label(self) -> int | None:
        return self.entry.label

    def __len__(self) -> int:
        return len(self.store)


def patches_dir(work: str | os.PathLike, patches: str | os.PathLike | None = None) -> Path:
    """Folder of ``<slide_id>.zarr`` patch stores: ``patches`` or ``W/patches``."""
    return Path(patches) if patches else Path(work) / "patches"


def open_patch_bags(
    entries: Sequence[SlideEntry], folder: Path, skip_empty: bool = False
) -> list[PatchBag]:
    """Open every entry's patch store; one :class:`StoreError` listing all that are missing.

    A store with 0 patches (a slide without tissue) is a :class:`DataError`, or with
    ``skip_empty`` (training) left out with one warning listing such slides."""
    missing = [e.slide_id for e in entries if not (folder / f"{e.slide_id}.zarr").exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise StoreError(
            f"no patch store in {folder} for {len(missing)} slide(s): {shown}",
            "run 'wsi-mil tile' for them first (end-to-end training reads pixels from W/patches)",
        )
    bags, empty = [], []
    for e in entries:
        store = PatchStore.open(folder / f"{e.slide_id}.zarr")
        if len(store) == 0:
            if not skip_empty:
                raise DataError(
                    f"{store.path}: patch store has 0 patches",
                    f"drop slide {e.slide_id} or re-tile with a lower --min-tissue",
                )
            empty.append(e.slide_id)
            continue
        bags.append(PatchBag(e, store))
    if empty:
        log.warning(
            "%d slides have no patches (no tissue found) and are left out: %s",
            len(empty),
            list_ids(empty),
        )
    if entries and not bags:
        raise DataError(
            f"none of the {len(entries)} slides has patches in {folder}",
            "re-tile with a lower --min-tissue, or --tissue none for all-foreground images",
        )
    sizes = {b.store.patch_size for b in bags}
    if len(sizes) > 1:
        raise DataError(
            f"patch stores of different patch sizes in one run: {sorted(sizes)}",
            "tile every slide with the same --patch-size",
        )
    return bags


class BagReader:
    """``read(start, stop) -> uint8 (n, P, P, 3)`` over a bag, optionally through a patch subset.

    ``indices``: sorted patch indices of the store (a sampled subset); None = all patches. For
    stores with pixels, reads go block by block (``block`` patches, the store's chunking), so
    memory is bounded by the requested patches plus one block; coords-only stores read from
    the slide, which is opened once and closed by :meth:`close`.
    """

    def __init__(
        self,
        store: PatchStore,
        indices: np.ndarray | None = None,
        block: int = 64,
        backend: str | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.indices = None if indices is None else np.asarray(indices, np.int64)
        self.block = block
        self._slide: Any = None

    def __len__(self) -> int:
        return len(self.store) if self.indices is None else len(self.indices)

    def norm_coords(self) -> np.ndarray:
        """(n, 2) float32 normalised coords of the bag's patches (in reading order)."""
        nc = self.store.norm_coords
        return nc if self.indices is None else nc[self.indices]

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if self.indices is None:
            return self._range(start, stop)
        idx = self.indices[start:stop]
        if not self.store.has_pixels:
            from wsi_mil.tiling.read import read_patches_from_slide

            st = self.store
            return read_patches_from_slide(
                self._open_slide(),
                st.coords[idx],
                st.level,
                st.patch_size,
                int(st.attrs.get("patch_size_level", st.patch_size)),
            )
        out = np.empty((len(idx), self.store.patch_size, self.store.patch_size, 3), np.uint8)
        blocks = idx // self.block
        for b in np.unique(blocks):
            sel = np.flatnonzero(blocks == b)
            lo, hi = int(idx[sel[0]]), int(idx[sel[-1]]) + 1
            out[sel] = self.store.pixels(lo, hi)[idx[sel] - lo]
        return out

    def _range(self, start: int, stop: int) -> np.ndarray:
        if self.store.has_pixels:
            return self.store.pixels(start, stop)
        return self.store.read_patches(start, stop, slide=self._open_slide())

    def _open_slide(self) -> Any:
        if self._slide is None:
            self._slide = self.store.open_slide(backend=self.backend)
        return self._slide

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def sample_indices(
    n: int, max_patches: int | None, seed: int, epoch: int, bag: int
) -> np.ndarray | None:
    """Sorted random subset of ``max_patches`` of ``range(n)`` (None: use all), from (seed, epoch, bag)."""
    if max_patches is None or n <= max_patches:
        return None
    rng = np.random.default_rng([int(seed), int(epoch), int(bag), 7])
    return np.sort(rng.choice(n, size=int(max_patches), replace=False))


# ---------------------------------------------------------------- pixels -> encoder input
def augment_patches(x: torch.Tensor) -> torch.Tensor:
    """Random dihedral transform (flips, 90-degree rotations) and per-channel affine colour jitter.

    ``x``: (n, 3, P, P) normalised float. Draws from torch's global RNG (replayed by the caller).
    """
    n = x.shape[0]
    dev = x.device
    flip = torch.rand(n, device=dev) < 0.5
    rot = torch.randint(0, 4, (n,), device=dev)
    gain = 1.0 + 0.1 * (2 * torch.rand(n, 3, 1, 1, device=dev, dtype=x.dtype) - 1)
    shift = 0.1 * torch.randn(n, 3, 1, 1, device=dev, dtype=x.dtype)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    out = x.clone()
    for k in (1, 2, 3):
        m = rot == k
        if bool(m.any()):
            out[m] = torch.rot90(x[m], k, dims=(-2, -1))
    return out * gain + shift


def make_prepare(info: Any, device: torch.device, augment: bool) -> Callable[[Any], torch.Tensor]:
    """uint8 (n, P, P, 3) -> normalised (n, 3, P, P) float on ``device`` [+ augmentation]."""

    def prepare(raw: Any) -> torch.Tensor:
        x = preprocess(raw, info, device=device)
        return augment_patches(x) if augment else x

    return prepare


# ---------------------------------------------------------------- model pieces
def resolve_norm(norm: str) -> str:
    if norm not in NORM_OPTIONS:
        raise ConfigError(
            f"--norm {norm!r} is not supported for end-to-end training",
            f"choose one of: {', '.join(NORM_OPTIONS)}",
        )
    return norm


def build_encoder(cfg: TrainConfig) -> nn.Module:
    """The encoder to train: ``cfg.encoder`` (+ ``cfg.weights``), BatchNorm or GroupNorm per ``cfg.norm``."""
    norm = "groupnorm" if resolve_norm(cfg.norm) == "groupnorm" else "bn"
    kw: dict[str, Any] = {}
    width = getattr(cfg, "encoder_width", None)
    if width is not None and not cfg.weights:
        if cfg.encoder != "resnet-patch-cnn" or int(width) < 1:
            raise ConfigError(f"--encoder-width {width}: only for resnet-patch-cnn, and >= 1")
        kw["widths"] = (int(width), 2 * int(width), 4 * int(width))
    return create_encoder(
        cfg.encoder,
        feature_dim=cfg.feature_dim,
        weights=cfg.weights,
        seed=cfg.seed,
        norm=norm,
        **kw,
    )


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def calibrate_batchnorm(encoder: nn.Module, batches: Iterator[torch.Tensor]) -> int:
    """Set BatchNorm running statistics to the exact averages over ``batches`` (no weight change).

    An untrained encoder's BN layers hold mean 0 / var 1, which frozen-BN training would keep;
    one no-grad pass over a sample of training patches gives them real statistics first.
    Returns the number of patches seen.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches
    encoder.train()
    n = 0
    with torch.no_grad():
        for x in batches:
            encoder(x)
            n += x.shape[0]
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    encoder.eval()
    return n


def standardise_output_layer(encoder: nn.Module, batches: Iterator[torch.Tensor]) -> bool:
    """Fold a per-feature standardisation into the encoder's last ``nn.Linear`` (in place).

    Features ``f = W x + b`` over ``batches`` get mean ``m`` and std ``s`` per output dim;
    ``W <- W / s``, ``b <- (b - m) / s`` makes them mean 0, std 1 on that sample (a
    data-dependent init, as in LSUV). Returns False (and changes nothing) when the encoder
    has no linear output layer.
    """
    fc = getattr(encoder, "fc", None)
    if not isinstance(fc, nn.Linear):
        return False
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            feats = torch.cat([encoder(x).float() for x in batches])
            if feats.shape[0] < 2:
                return False
            m, s = feats.mean(0), feats.std(0).clamp_min(1e-6)
            fc.weight.div_(s[:, None].to(fc.weight.dtype))
            if fc.bias is not None:
                fc.bias.sub_(m.to(fc.bias.dtype)).div_(s.to(fc.bias.dtype))
        return True
    finally:
        encoder.train(was_training)


def device_settings(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, channels_last): bf16 + channels_last on CUDA, exact float32 on CPU."""
    return (torch.bfloat16, True) if device.type == "cuda" else (None, False)


# ---------------------------------------------------------------- checkpoints
def export_encoder(
    encoder: nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Write ``encoder.pt``: ``{"encoder": name, "kwargs": {...}, "state_dict": {...}}`` (weights_only-safe)."""
    info = encoder.info  # type: ignore[attr-defined]
    sd = state_dict if state_dict is not None else encoder.state_dict()
    obj = {
        "encoder": info.name,
        "kwargs": to_plain(dict(info.kwargs)),
        "state_dict": {k: v.detach().cpu().clone() for k, v in sd.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ---------------------------------------------------------------- training
ENCODER_LR_FACTOR = 0.1  # default encoder LR = this x --lr (the head's)


def resolve_encoder_lr(cfg: TrainConfig) -> float:
    """The encoder's learning rate: ``--encoder-lr``, else ``ENCODER_LR_FACTOR * --lr``.

    Measured on configs/e2e-small.yaml: with the encoder at the head's 1e-3 from the start the
    loss went back to ln 2 and stayed there; at 1e-4 it learned (faster still with
    --freeze-encoder-epochs 3).
    """
    return float(cfg.encoder_lr) if cfg.encoder_lr is not None else ENCODER_LR_FACTOR * cfg.lr


def check_e2e_config(cfg: TrainConfig) -> None:
    """:class:`ConfigError` for e2e options out of range."""
    resolve_norm(cfg.norm)
    if cfg.chunk_size < 1:
        raise ConfigError(f"--chunk-size {cfg.chunk_size} must be >= 1")
    if cfg.max_patches_per_bag is not None and cfg.max_patches_per_bag < 1:
        raise ConfigError(
            f"--max-patches-per-bag {cfg.max_patches_per_bag} must be >= 1 (or unset for all patches)"
        )
    if cfg.freeze_encoder_epochs < 0:
        raise ConfigError(f"--freeze-encoder-epochs {cfg.freeze_encoder_epochs} must be >= 0")
    if cfg.encoder_lr is not None and cfg.encoder_lr < 0:
        raise ConfigError(f"--encoder-lr {cfg.encoder_lr} must be >= 0")


def step_seed(seed: int, epoch: int, bag: int) -> int:
    """Seed of one bag's step (augmentation, dropout), from (seed, epoch, bag index) only."""
    return chunk_seed(chunk_seed(seed, epoch), bag)


class E2ETrainer(Trainer):
    """:class:`wsi_mil.train.loop.Trainer` with the encoder in the loop.

    ``self.model`` is the MIL head (so checkpoints' ``model``/``model_config`` read like cached
    runs'); the encoder is a second AdamW param group (``encoder_lr``), trained by
    :func:`chunked_bag_step`, checkpointed under ``extra["encoder"]``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        head: nn.Module,
        encoder: nn.Module,
        train_bags: Sequence[PatchBag],
        val_bags: Sequence[PatchBag],
        run_dir: Path,
        info: Any,
        progress: bool = True,
        inputs: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            cfg, head, train_bags, val_bags, run_dir, info=info, progress=progress, inputs=inputs
        )
        self.encoder = encoder.to(self.device)
        self.enc_info = encoder.info  # type: ignore[attr-defined]
        self.amp_dtype, self.channels_last = device_settings(self.device)
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.current_epoch = 0

    input_kind = "patch stores"

    def param_groups(self) -> list[dict[str, Any]]:
        enc_lr = resolve_encoder_lr(self.cfg)
        return [
            {"params": list(self.model.parameters()), "lr": self.cfg.lr, "name": "head"},
            {"params": list(self.encoder.parameters()), "lr": enc_lr, "name": "encoder"},
        ]

    @property
    def encoder_trainable(self) -> bool:
        return self.current_epoch >= self.cfg.freeze_encoder_epochs

    def _prepare(self, augment: bool) -> Callable[[Any], torch.Tensor]:
        return make_prepare(self.enc_info, self.device, augment)

    def train_epoch(self, epoch: int) -> float:
        if epoch == 0:
            self.calibrate_if_needed()
        self.current_epoch = epoch
        train_enc = self.encoder_trainable
        if train_enc:
            self.encoder.train()
            freeze_batchnorm(self.encoder)
        else:
            self.encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(train_enc)
        self._train_prep = self._prepare(bool(self.cfg.augment) and train_enc)
        self.patches_seen = 0
        return super().train_epoch(epoch)

    def forward_backward(self, bag: Any, scale: float) -> float:
        cfg = self.cfg
        idx = sample_indices(
            len(bag), cfg.max_patches_per_bag, cfg.seed, self.current_epoch, bag.index
        )
        reader = BagReader(bag.store, idx, backend=cfg.backend)
        try:
            res = chunked_bag_step(
                self.encoder, self.model, reader, len(reader), cfg.chunk_size,
                torch.from_numpy(reader.norm_coords()), float(bag.label), loss_fn=self._loss,
                prepare=self._train_prep, seed=step_seed(cfg.seed, self.current_epoch, bag.index),
                device=self.device, amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                train_encoder=self.encoder_trainable, loss_scale=scale,
            )  # fmt: skip
        finally:
            reader.close()
        if not math.isfinite(res.loss):
            raise DataError(
                f"slide {bag.slide_id}: training loss is {res.loss}",
                "lower --lr / --encoder-lr, or check the patches",
            )
        self.patches_seen += len(reader)
        return res.loss

    def _loss(self, out: Any, label: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(out.logit.reshape(()), label.reshape(()).to(out.logit.dtype))

    @torch.no_grad()
    def predict_logit(self, bag: Any) -> float:
        self.encoder.eval()
        reader = BagReader(bag.store, backend=self.cfg.backend)
        try:
            feats = encode_bag(
                self.encoder,
                reader,
                len(reader),
                self.cfg.chunk_size,
                self._prepare(False),
                None,
                self.device,
                self.amp_dtype,
                self.channels_last,
            )
        finally:
            reader.close()
        return float(
            self.model(feats, torch.from_numpy(reader.norm_coords()).to(self.device)).logit
        )

    def extra_state(self) -> dict[str, Any]:
        from wsi_mil.train.predict import training_resolution

        bags = [*self.train_bags, *self.val_bags]
        sizes = {int(b.store.patch_size) for b in bags}
        return {
            "encoder": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
            "encoder_name": self.enc_info.name,
            "encoder_kwargs": to_plain(dict(self.enc_info.kwargs)),
            # one size (load_bags refuses mixed ones): predict checks its stores against it
            "patch_size": sizes.pop() if len(sizes) == 1 else None,
            # output_mpp, downsample: predict checks its stores' resolution against them
            **training_resolution(b.store.attrs for b in bags),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "encoder" not in state:
            raise StoreError(
                f"{self.ckpt_dir / 'last.pt'} is not an end-to-end checkpoint (no encoder)",
                "resume with the --mode the run was started with, or use a new --run",
            )
        self.encoder.load_state_dict(state["encoder"])

    def calibrate_if_needed(self) -> None:
        """Data-dependent initialisation from a sample of training patches (first epoch only).

        Untrained encoder: BatchNorm layers get real frozen statistics
        (:func:`calibrate_batchnorm`), then the final linear layer is rescaled so each output
        feature has mean 0 and std 1 over the sample (:func:`standardise_output_layer`).
        Without the second step a random encoder's features barely vary between patches
        (per-dim std ~0.07 here), so the head needs hundreds of epochs before its logits
        leave 0 and the loss stays at ln 2. Then, for any encoder, the head's fixed input
        standardisation (``feature_norm="standard"``) is set from the sample's features.
        """
        untrained = not self.enc_info.trained
        standardise_head = self.model.cfg.feature_norm == "standard"
        if self.epoch > 0 or not (untrained or standardise_head):
            return
        rng = np.random.default_rng([self.cfg.seed, 11])
        per_bag = max(1, 512 // max(1, len(self.train_bags)))
        cs = self.cfg.chunk_size
        # read (decode) the sample once; up to three passes below reuse the raw patches
        raw: list[np.ndarray] = []
        for i in rng.permutation(len(self.train_bags)):
            bag = self.train_bags[int(i)]
            idx = np.sort(rng.choice(len(bag), size=min(per_bag, len(bag)), replace=False))
            r = BagReader(bag.store, idx, backend=self.cfg.backend)
            try:
                raw.extend(r(s, min(s + cs, len(r))) for s in range(0, len(r), cs))
            finally:
                r.close()
        prep = self._prepare(False)

        def batches() -> Iterator[torch.Tensor]:
            return (prep(x).to(self.device) for x in raw)

        if untrained and has_batchnorm(self.encoder):
            n = calibrate_batchnorm(self.encoder, batches())
            log.info(
                "calibrated the BatchNorm statistics of the untrained encoder on %d patches", n
            )
        if untrained and standardise_output_layer(self.encoder, batches()):
            log.info("standardised the untrained encoder's output features (mean 0, std 1)")
        if standardise_head:
            self.encoder.eval()
            with torch.no_grad():
                feats = [self.encoder(x).float() for x in batches()]
            self.model.set_feature_stats(*feature_stats(feats))  # type: ignore[operator]

    def fit(self) -> Path:
        run = super().fit()
        if dist_.is_main(self.info):
            best = self.ckpt_dir / "best.pt"
            sd = load_checkpoint_file(best)["extra"]["encoder"] if best.is_file() else None
            export_encoder(self.encoder, self.run_dir / "encoder.pt", sd)
        return run


def open_e2e_bags(
    cfg: TrainConfig, entries: Sequence[SlideEntry]
) -> tuple[list[PatchBag], list[PatchBag], dict[str, str]]:
    """Training and validation patch bags (split as in cached training) and the split table."""
    from wsi_mil.train.cached import select_splits

    splits = select_splits(cfg, entries)
    use = [e for e in entries if splits.get(e.slide_id) in ("train", "val")]
    bags = open_patch_bags(
        use, patches_dir(cfg.work, getattr(cfg, "patches", None)), skip_empty=True
    )
    train = [b for b in bags if splits[b.slide_id] == "train"]
    val = [b for b in bags if splits[b.slide_id] == "val"]
    for i, b in enumerate(train):
        b.index = i
    for i, b in enumerate(val):
        b.index = i
    return train, val, splits


def train_e2e(cfg: TrainConfig, entries: Sequence[SlideEntry], progress: bool = True) -> Path:
    """Train encoder + head end to end on the slides' patch stores; returns the run folder ``R``.

    Pixels: ``W/patches/<slide_id>.zarr`` (from the slide for coords-only stores).
    """
    info = dist_.init_distributed(cfg.device)
    try:
        return _train_e2e(cfg, entries, info, progress)
    finally:
        dist_.cleanup(info)


def _train_e2e(cfg: TrainConfig, entries: Sequence[SlideEntry], info: Any, progress: bool) -> Path:
    from wsi_mil.features.extract import store_digest
    from wsi_mil.mil.model import PositionalAttentionMIL
    from wsi_mil.train.cached import (
        check_resume_checkpoint,
        check_resume_options,
        check_train_classes,
        prepare_run_dir,
        resolve_run_flags,
        write_splits_csv,
    )

    check_e2e_config(cfg)
    cfg = resolve_run_flags(cfg)
    main = dist_.is_main(info)
    train, val, splits = open_e2e_bags(cfg, entries)
    check_train_classes(train)  # type: ignore[arg-type]
    encoder = build_encoder(cfg)
    enc_info = encoder.info  # type: ignore[attr-defined]
    model_cfg = replace(cfg.model, in_dim=int(enc_info.out_dim))
    resolved = replace(cfg, mode="e2e", model=model_cfg, encoder_lr=resolve_encoder_lr(cfg))
    run = Path(cfg.run)
    # what the run learns from: the patch stores' content (as extract judges it current)
    inputs = {b.slide_id: store_digest(b.store) for b in [*train, *val]}
    check_resume_options(cfg, resolved)
    check_resume_checkpoint(cfg, train, val, inputs, "patch stores")
    if main:
        run = prepare_run_dir(cfg)
        save_resolved(resolved, run / "config.yaml")
        write_splits_csv(run / "splits.csv", [*train, *val], splits)  # type: ignore[list-item]
    dist_.barrier(info)
    log.info(
        "end-to-end training on %d slides (%d pos, %d patches), validating on %d; encoder %s (%s), chunk %d%s",
        len(train), sum(b.label == 1 for b in train), sum(len(b) for b in train), len(val),
        enc_info.name, cfg.norm, cfg.chunk_size,
        f", at most {cfg.max_patches_per_bag} patches per bag" if cfg.max_patches_per_bag else "",
    )  # fmt: skip
    seed_everything(cfg.seed)
    head = PositionalAttentionMIL(model_cfg)
    trainer = E2ETrainer(
        resolved, head, encoder, train, val, run, info, progress=progress, inputs=inputs
    )
    trainer.fit()
    if main:
        from wsi_mil.train.cached import _plot_history

        _plot_history(trainer, run)
    return run


# ---------------------------------------------------------------- prediction support
class E2EEncoder:
    """A trained e2e run's encoder, ready to turn patch stores into feature bags.

    ``checkpoint``: "best" | "last" | a path to a checkpoint (its ``extra["encoder"]`` state),
    falling back to ``R/encoder.pt``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        device: str | torch.device = "auto",
        checkpoint: str = "best",
    ) -> None:
        from wsi_mil.config import from_dict, load_full_config

        self.run = Path(run_dir)
        cfg_path = self.run / "config.yaml"
        if not cfg_path.is_file():
            raise StoreError(
                f"{self.run}: no config.yaml (not a training run folder?)",
                "pass the --run folder of 'wsi-mil train --mode e2e'",
            )
        raw = load_full_config(cfg_path)
        raw = {k: v for k, v in raw.items() if k in TrainConfig.__dataclass_fields__}
        model = raw.pop("model", None) or {}
        self.cfg: TrainConfig = from_dict(TrainConfig, raw)
        self.cfg.model = from_dict(ModelConfig, model)
        enc_pt = self.run / "encoder.pt"
        sd = None
        ck_path = (
            Path(checkpoint)
            if checkpoint not in ("best", "last")
            else self.run / "checkpoints" / f"{checkpoint}.pt"
        )
        if ck_path.is_file():
            sd = (load_checkpoint_file(ck_path).get("extra") or {}).get("encoder")
        if sd is None and not enc_pt.is_file():
            raise StoreError(
                f"{self.run}: neither {ck_path} with an encoder nor encoder.pt",
                "the e2e run did not finish an epoch; train (or --resume) it first",
            )
        self.encoder = (
            create_encoder(weights=enc_pt, seed=self.cfg.seed)
            if enc_pt.is_file()
            else build_encoder(self.cfg)
        )
        if sd is not None:
            self.encoder.load_state_dict(sd)
        from wsi_mil.features.extract import resolve_device

        self.device = (
            resolve_device(str(device)) if not isinstance(device, torch.device) else device
        )
        self.amp_dtype, self.channels_last = device_settings(self.device)
        self.encoder.to(self.device).eval()
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.prepare = make_prepare(self.encoder.info, self.device, False)  # type: ignore[attr-defined]

    def encode(
        self,
        entry: SlideEntry,
        work: str | os.PathLike,
        progress: bool = False,
        patches: str | os.PathLike | None = None,
    ) -> FeatureBag:
        """The slide's (N, D) features from its patch store (``patches`` or ``W/patches``), all patches."""
        from wsi_mil.features.extract import feature_attrs, store_digest

        folder = patches_dir(work, patches)
        (bag,) = open_patch_bags([entry], folder)
        reader = BagReader(bag.store, backend=self.cfg.backend)
        bar = tqdm(
            total=len(reader),
            desc=f"encode {entry.slide_id}",
            unit="patch",
            disable=not progress,
            leave=False,
        )
        try:
            feats = encode_bag(
                self.encoder,
                reader,
                len(reader),
                self.cfg.chunk_size,
                self.prepare,
                None,
                self.device,
                self.amp_dtype,
                self.channels_last,
                progress=bar.update,
            )
        finally:
            reader.close()
            bar.close()
        st = bag.store
        attrs = feature_attrs(
            st, self.encoder.info, store_digest(st), entry.path or st.slide_path, entry.slide_id
        )  # type: ignore[attr-defined]
        return FeatureBag(
            feats.float().cpu().numpy(), st.coords.copy(), attrs, None, st.level0_size
        )


def encode_bags(
    run_dir: str | os.PathLike,
    entries: Sequence[SlideEntry],
    work: str | os.PathLike,
    device: str | torch.device = "auto",
    checkpoint: str = "best",
    progress: bool = False,
    patches: str | os.PathLike | None = None,
) -> Iterator[tuple[SlideEntry, FeatureBag]]:
    """(entry, FeatureBag) for each entry, encoded by the e2e run's trained encoder (lazily, one at a time).

    Raises :class:`StoreError` for a slide without a patch store; use :class:`E2EEncoder`
    directly to handle slides one by one.
    """
    enc = E2EEncoder(run_dir, device, checkpoint)
    for e in entries:
        yield e, enc.encode(e, work, progress=progress, patches=patches)
