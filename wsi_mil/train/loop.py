"""The training loop as a small object with short methods (torchtune-recipe style).

:class:`Trainer` owns the model, optimiser (AdamW), scheduler, early stopping, RNG states
and the run folder's checkpoints / ``metrics.csv``. Cached training uses it as is; other
modes override the per-bag hooks :meth:`Trainer.forward_backward` and
:meth:`Trainer.predict_logit` (and :meth:`Trainer.extra_state` for more to checkpoint).

Semantics with ``torchrun`` (``wsi_mil.train.distributed``): each epoch a permutation of the
training bags drawn from (seed, epoch) is cut into groups of G = bags_per_step * world_size;
rank r backprops ``sum(loss of group[r*B:(r+1)*B]) / len(group)``, gradients are summed over
ranks, then every rank takes the same optimizer step - the mean gradient over the group,
exactly as one process accumulating the same bags. Validation bags are sharded over ranks
and gathered; only rank 0 writes files.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_mil.batch import atomic_path
from wsi_mil.config import TrainConfig, to_plain
from wsi_mil.errors import ConfigError, StoreError
from wsi_mil.train import distributed as dist_
from wsi_mil.train.metrics import bce_from_logits, roc_auc
from wsi_mil.train.splits import epoch_permutation, step_groups

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "wsi-mil-checkpoint-v1"
METRIC_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_auc",
    "val_accuracy",
    "lr",
    "seconds",
    "best",
]


# ---------------------------------------------------------------- early stopping
@dataclass
class EarlyStopping:
    """Tracks the monitored value; ``stopped`` after ``patience`` epochs without improvement.

    ``metric``: "val_loss" (lower is better) | "val_auc" (higher) | "none" (every epoch is
    the best, never stops).
    """

    metric: str = "val_loss"
    patience: int = 10
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False

    def update(self, value: float | None, epoch: int) -> bool:
        """Record epoch ``epoch`` (1-based); True if it is the new best."""
        if self.metric == "none" or value is None or not math.isfinite(value):
            if self.metric == "none" or self.best is None:
                self.best_epoch = epoch
                return True
            improved = False
        else:
            sign = -1.0 if self.metric == "val_loss" else 1.0
            improved = self.best is None or sign * (value - self.best) > self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
            if self.patience > 0 and self.bad_epochs >= self.patience:
                self.stopped = True
        return improved

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


# ---------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *map(_py, np_state[2:]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def set_rng_state(st: dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_checkpoint_file(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a clear error for missing or foreign files
    (``fix``: what the error tells the user to do; default: pick another --checkpoint)."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(
            f"checkpoint {p} does not exist", "train first, or pass --checkpoint best|last|PATH"
        )
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt / foreign file is a user problem
        from wsi_mil.features.encoders import torch_load_problem

        why = torch_load_problem(p, e) or "it holds objects other than tensors and containers"
        raise StoreError(
            f"checkpoint {p} is not a PyTorch checkpoint written by 'wsi-mil train' ({why})",
            fix
            or "pass --checkpoint best, last or a R/checkpoints/<name>.pt of a 'wsi-mil train' run",
        ) from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise StoreError(f"{p} is not a wsi-mil checkpoint (no 'model' entry)")
    return ck


#: how to go on when a run cannot be resumed ('wsi-mil run' resumes by itself: there,
#: overwrite belongs in the config for one run only; it wins over resume)
RESUME_FIX = "start afresh with --overwrite (config: train: overwrite: true, for one run)"


def check_resumable(
    ck: dict[str, Any],
    path: str | os.PathLike,
    epochs: int,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    inputs: dict[str, str] | None = None,
    kind: str = "feature stores",
    labels: dict[str, int] | None = None,
) -> None:
    """:class:`ConfigError` when checkpoint ``ck`` (read from ``path``) cannot go on as this run.

    Refused: other train/val slides; ``inputs`` (slide_id -> digest of the store the slide's
    bag is read from) that differ from the ones the checkpoint records (its model learnt from
    other features or patches, which the run would now mix in); more epochs already trained
    than ``epochs`` (``config.yaml`` would claim fewer epochs than ``metrics.csv`` holds).
    Checkpoints written before inputs were recorded are not compared on them. ``labels``
    (slide_id -> label of the train and val slides) that differ from the recorded ones
    are refused too (checkpoints written before labels were recorded: not compared).
    """
    for key, mine in (("train_ids", train_ids), ("val_ids", val_ids)):
        if ck.get(key) is not None and list(ck[key]) != list(mine):
            raise ConfigError(
                f"--resume: {path} was trained on other {key.split('_')[0]} slides than this run selects",
                "resume with the same slide table, features and split options, or start a new --run",
            )
    recorded = ck.get("inputs") or {}
    if inputs is not None and recorded:
        changed = [s for s in recorded if s in inputs and inputs[s] != recorded[s]]
        if changed:
            shown = ", ".join(changed[:5]) + (
                f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""
            )
            raise ConfigError(
                f"--resume: {path} was trained on other {kind}: those of {len(changed)} of "
                f"{len(recorded)} slides changed since ({shown}), and continuing would mix "
                "the two",
                f"{RESUME_FIX}, give another --run, or restore the {kind} it was trained on",
            )
    had = ck.get("labels") or {}
    if labels is not None and had:
        flipped = [s for s in had if s in labels and int(labels[s]) != int(had[s])]
        if flipped:
            shown = ", ".join(flipped[:5]) + (
                f" (+{len(flipped) - 5} more)" if len(flipped) > 5 else ""
            )
            raise ConfigError(
                f"--resume: {path} was trained with other labels for {len(flipped)} "
                f"slide(s) ({shown}), and continuing would mix the two",
                f"{RESUME_FIX}, give another --run, or restore the labels it was trained on",
            )
    done = int(ck.get("epoch", 0))
    if done > epochs:
        raise ConfigError(
            f"--resume: {path} has already trained {done} epochs, more than --epochs {epochs}",
            f"pass --epochs {done} or more to keep the run, {RESUME_FIX}, or give another --run",
        )


# ---------------------------------------------------------------- trainer
class Trainer:
    """Train a MIL head on in-memory bags (objects with ``.label``, ``.slide_id``).

    ``fit()`` = ``setup()`` [+ ``resume()``] + per epoch ``train_epoch`` / ``validate`` /
    ``end_epoch`` (scheduler, early stopping, checkpoints, metrics.csv, log line).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train_bags: Sequence[Any],
        val_bags: Sequence[Any],
        run_dir: str | Path,
        info: dist_.DistInfo | None = None,
        progress: bool = True,
        inputs: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.train_bags = list(train_bags)
        self.val_bags = list(val_bags)
        self.run_dir = Path(run_dir)
        self.info = info or dist_.DistInfo()
        self.device = self.info.device
        self.progress = progress and dist_.is_main(self.info)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.epoch = 0  # completed epochs
        self.history: list[dict[str, Any]] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.early = EarlyStopping()
        #: slide_id -> digest of the store its bag is read from; checkpointed, so that
        #: --resume refuses once the stores have changed (see :func:`check_resumable`)
        self.inputs: dict[str, str] = dict(inputs or {})

    #: what :attr:`inputs` are digests of (for messages)
    input_kind = "feature stores"

    # ------------------------------------------------------------ setup
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (override for e.g. a separate encoder learning rate)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def setup(self) -> None:
        """Model to device, AdamW, scheduler, early stopping."""
        cfg = self.cfg
        if cfg.epochs < 1:
            raise ConfigError(f"--epochs {cfg.epochs} must be >= 1")
        if cfg.bags_per_step < 1:
            raise ConfigError(f"--bags-per-step {cfg.bags_per_step} must be >= 1")
        if cfg.early_stop not in ("val_loss", "val_auc", "none"):
            raise ConfigError(f"--early-stop {cfg.early_stop!r}", "use val_loss, val_auc or none")
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.param_groups(),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
        )
        if cfg.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=cfg.epochs
            )
        elif cfg.scheduler in ("none", "", None):
            self.scheduler = None
        else:
            raise ConfigError(f"--scheduler {cfg.scheduler!r}", "use cosine or none")
        metric = cfg.early_stop if self.val_bags else "none"
        if cfg.early_stop != "none" and not self.val_bags:
            log.warning("no validation slides: early stopping is off and best.pt = last.pt")
        self.early = EarlyStopping(metric=metric, patience=cfg.patience, min_delta=cfg.min_delta)

    # ------------------------------------------------------------ per-bag hooks
    def bag_target(self, bag: Any) -> torch.Tensor:
        return torch.tensor(float(bag.label), device=self.device)

    def forward_backward(self, bag: Any, scale: float) -> float:
        """Loss of one bag; backprops ``scale * loss`` into the parameters' ``.grad``."""
        feats = bag.features.to(self.device, non_blocking=True)
        xy = None if bag.norm_coords is None else bag.norm_coords.to(self.device, non_blocking=True)
        out = self.model(feats, xy)
        loss = self.loss_fn(out.logit, self.bag_target(bag))
        (loss * scale).backward()
        return float(loss.detach())

    @torch.no_grad()
    def predict_logit(self, bag: Any) -> float:
        """The model's logit for one bag (eval mode is set by the caller)."""
        feats = bag.features.to(self.device, non_blocking=True)
        xy = None if bag.norm_coords is None else bag.norm_coords.to(self.device, non_blocking=True)
        return float(self.model(feats, xy).logit)

    # ------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int) -> float:
        """One pass over the training bags (0-based ``epoch``); returns the mean bag loss."""
        from tqdm.auto import tqdm

        assert self.optimizer is not None, "call setup() first"
        self.model.train()
        order = epoch_permutation(len(self.train_bags), self.cfg.seed, epoch)
        b = self.cfg.bags_per_step
        groups = step_groups(order, b * self.info.world_size)
        loss_sum, n_bags = 0.0, 0
        bar = tqdm(
            groups,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            unit="step",
            disable=not self.progress,
            leave=False,
        )
        for group in bar:
            self.optimizer.zero_grad(set_to_none=True)
            for i in dist_.rank_slice(group, self.info, b):
                loss_sum += self.forward_backward(self.train_bags[i], 1.0 / len(group))
                n_bags += 1
            # every parameter the optimiser steps (e2e adds the encoder's group)
            dist_.allreduce_gradients(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.info
            )
            self.optimizer.step()
            if n_bags:
                bar.set_postfix(loss=f"{loss_sum / n_bags:.4f}", refresh=False)
        parts = dist_.allgather_objects((loss_sum, n_bags), self.info)
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return total / max(count, 1)

    def validate(self) -> dict[str, Any]:
        """Validation loss, AUC and accuracy at 0.5 (``None`` without validation bags)."""
        if not self.val_bags:
            return {"val_loss": None, "val_auc": None, "val_accuracy": None}
        self.model.eval()
        mine = dist_.shard_for_rank(list(range(len(self.val_bags))), self.info)
        rows = [(i, self.predict_logit(self.val_bags[i])) for i in mine]
        rows = sorted(r for part in dist_.allgather_objects(rows, self.info) for r in part)
        labels = np.array([self.val_bags[i].label for i, _ in rows], np.float64)
        logits = np.array([z for _, z in rows], np.float64)
        probs = 1.0 / (1.0 + np.exp(-logits))
        return {
            "val_loss": bce_from_logits(labels, logits),
            "val_auc": roc_auc(labels, probs),
            "val_accuracy": float(((probs >= 0.5) == (labels == 1)).mean()),
        }

    def monitored(self, val: dict[str, Any]) -> float | None:
        if self.early.metric == "none":
            return None
        v = val.get(self.early.metric)
        if v is None and self.early.metric == "val_auc":
            log.warning(
                "validation AUC undefined (one class in the validation split); early stopping on val_loss"
            )
            self.early.metric = "val_loss"
            self.early.best = None
            v = val.get("val_loss")
        return v

    def end_epoch(self, epoch: int, train_loss: float, val: dict[str, Any], seconds: float) -> None:
        """Scheduler step, early stopping, checkpoints, metrics.csv and the log line."""
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer else float("nan")
        if self.scheduler is not None:
            self.scheduler.step()
        improved = self.early.update(self.monitored(val), epoch + 1)
        self.epoch = epoch + 1
        row = {
            "epoch": self.epoch,
            "train_loss": train_loss,
            **val,
            "lr": lr,
            "seconds": round(seconds, 3),
            "best": improved,
        }
        self.history.append(row)
        if dist_.is_main(self.info):
            if improved:
                self.save_checkpoint("best.pt")
            self.save_checkpoint("last.pt")
            self.write_metrics_csv()
        dist_.barrier(self.info)
        if dist_.is_main(self.info):
            log.info(
                "epoch %d/%d  train_loss %.4f  val_loss %s  val_auc %s  lr %.2e  %.1fs%s",
                self.epoch,
                self.cfg.epochs,
                train_loss,
                _fmt(val.get("val_loss")),
                _fmt(val.get("val_auc")),
                lr,
                seconds,
                "  *best" if improved else "",
            )

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.epochs or self.early.stopped

    def fit(self) -> Path:
        """Train to ``cfg.epochs`` or early stop; resumes from last.pt with ``cfg.resume``."""
        if self.optimizer is None:
            self.setup()
        if self.cfg.resume:
            self.resume()
        while not self.finished:
            t0 = time.perf_counter()
            train_loss = self.train_epoch(self.epoch)
            val = self.validate()
            self.end_epoch(self.epoch, train_loss, val, time.perf_counter() - t0)
        if self.early.stopped and dist_.is_main(self.info):
            log.info(
                "early stop after epoch %d: no %s improvement for %d epochs (best epoch %d)",
                self.epoch,
                self.early.metric,
                self.early.bad_epochs,
                self.early.best_epoch,
            )
        return self.run_dir

    # ------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        """More to checkpoint (override; weights_only-loadable values only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Counterpart of :meth:`extra_state`."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, scheduler, RNG, stopper."""
        model_cfg = getattr(self.model, "cfg", None)
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_config": to_plain(model_cfg) if model_cfg is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "early_stopping": self.early.state_dict(),
            "rng": rng_state(),
            "history": [dict(r) for r in self.history],
            "train_ids": [b.slide_id for b in self.train_bags],
            "val_ids": [b.slide_id for b in self.val_bags],
            "inputs": dict(self.inputs),
            "labels": self.labels(),
            "train_config": to_plain(self.cfg),
            "extra": self.extra_state(),
        }

    def labels(self) -> dict[str, int]:
        """slide_id -> label of the train and val bags (recorded in checkpoints)."""
        return {b.slide_id: int(b.label) for b in [*self.train_bags, *self.val_bags]}

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        if self.optimizer is not None and ck.get("optimizer"):
            self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None and ck.get("scheduler"):
            self.scheduler.load_state_dict(ck["scheduler"])
        self.early.load_state_dict(ck["early_stopping"])
        self.history = [dict(r) for r in ck.get("history", [])]
        self.epoch = int(ck["epoch"])
        self.load_extra_state(ck.get("extra") or {})
        set_rng_state(ck["rng"])

    def save_checkpoint(self, name: str) -> Path:
        """Write ``R/checkpoints/<name>`` atomically."""
        final = self.ckpt_dir / name
        with atomic_path(final) as tmp:
            torch.save(self.state_dict(), tmp)
        return final

    def resume(self) -> None:
        """Continue from ``R/checkpoints/last.pt`` (start afresh, with a note, if there is none)."""
        last = self.ckpt_dir / "last.pt"
        if not last.is_file():
            log.info("--resume: no %s yet, starting from epoch 1", last)
            return
        ck = load_checkpoint_file(last, fix=RESUME_FIX)
        check_resumable(
            ck,
            last,
            self.cfg.epochs,
            [b.slide_id for b in self.train_bags],
            [b.slide_id for b in self.val_bags],
            self.inputs or None,
            self.input_kind,
            self.labels(),
        )
        self.load_state_dict(ck)
        if dist_.is_main(self.info):
            log.info("resumed %s at epoch %d/%d", last, self.epoch, self.cfg.epochs)

    def write_metrics_csv(self) -> None:
        """``R/metrics.csv``: one row per completed epoch (rewritten atomically)."""
        with atomic_path(self.run_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in self.history:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_COLUMNS})


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
